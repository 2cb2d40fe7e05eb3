"""Where GPU time goes: an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum --csv`)
summed by kernel name, largest first: the whole run, then (`--unet-step`) one UNet call alone.

    python bench/kernel_table.py ncu.csv [--top 25] [--unet-step]

The UNet call is found in the kernel sequence of `sparkle bench engine --steps 1` (a warm-up
round, then a timed one): it ends where the timed round's scheduler update begins (the
second-to-last `bsub_f32`) and starts after the text encoder's last softmax before that.
"""
import argparse
import collections
import csv
import io


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--unet-step", action="store_true", help="also the timed round's UNet call alone")
    args = ap.parse_args()
    text = open(args.csv, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print("no kernel rows in", args.csv)
        print(text[-2000:])
        return
    kernels = []
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        short = row["Kernel Name"].split("(")[0].split("<")[0][:60]
        kernels.append((short, float(row["Metric Value"].replace(",", ""))))
    table(kernels, "the whole run", args.top)
    if args.unet_step:
        updates = [i for i, (name, _) in enumerate(kernels) if name.startswith("bsub_f32")]
        if len(updates) < 2:
            print("no scheduler update found: not a `bench engine --steps 1` profile")
            return
        end = updates[-2]
        softmaxes = [i for i, (name, _) in enumerate(kernels[:end]) if name.startswith("softmax")]
        table(kernels[(softmaxes[-1] + 1 if softmaxes else 0):end], "one UNet call", args.top)


def table(kernels, what, top):
    total = collections.Counter()
    count = collections.Counter()
    for name, ns in kernels:
        total[name] += ns
        count[name] += 1
    all_ns = sum(total.values())
    print(f"{what}: {len(kernels)} kernels, {all_ns / 1e6:.2f} ms of GPU time")
    print("| kernel | calls | ms | share |")
    print("|---|---:|---:|---:|")
    for name, ns in total.most_common(top):
        print(f"| `{name}` | {count[name]} | {ns / 1e6:.2f} | {100 * ns / all_ns:.1f}% |")


if __name__ == "__main__":
    main()
