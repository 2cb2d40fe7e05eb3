"""Where GPU time goes: an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum --csv`)
summed by kernel name, largest first.

    python bench/kernel_table.py ncu.csv [--top 25]
"""
import argparse
import collections
import csv
import io


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    text = open(args.csv, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print("no kernel rows in", args.csv)
        print(text[-2000:])
        return
    total = collections.Counter()
    count = collections.Counter()
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"]
        short = name.split("(")[0].split("<")[0][:60]
        total[short] += float(row["Metric Value"].replace(",", ""))
        count[short] += 1
    all_ns = sum(total.values())
    print(f"{sum(count.values())} kernels, {all_ns / 1e6:.1f} ms of GPU time")
    print(f"| kernel | calls | ms | share |")
    print("|---|---:|---:|---:|")
    for name, ns in total.most_common(args.top):
        print(f"| `{name}` | {count[name]} | {ns / 1e6:.2f} | {100 * ns / all_ns:.1f}% |")


if __name__ == "__main__":
    main()
