#!/usr/bin/env bash
# On the lent GPU machine: an Nsight Compute profile (every section) of the attention
# kernels at SD 1.5's widest attention, 4096 queries over 4096 keys, heads 40 wide, f16 —
# the `mma.sync` kernel and the warpgroup ones, as `attention_matches_the_formula` launches
# them first. Expects .carry/bin/engine-tests.xz (tools/device/build-cuda.sh). The raw
# report goes to $OUT/attention.csv, a summary of the telling metrics to stdout.
#   LAUNCHES=3  bash tools/device/attention-profile.sh
set -uo pipefail
OUT=${OUT:-./bench-out}; mkdir -p "$OUT"
source "$(dirname "$0")/env.sh"
xz -dc .carry/bin/engine-tests.xz > /tmp/engine-tests && chmod +x /tmp/engine-tests || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout "${PROFILE_TIMEOUT:-240}" ncu --set full -k 'regex:flash_attention_(48x2p|wg48|wg48pipep)_f16' --launch-count "${LAUNCHES:-3}" \
  --csv --page details --log-file "$OUT/attention.csv" \
  /tmp/engine-tests attention_matches_the_formula --test-threads=1 >/dev/null 2>&1
echo "ncu rc=$?"
$PY - "$OUT/attention.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
want = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "Registers Per Thread",
        "Achieved Occupancy", "Theoretical Occupancy", "Dynamic Shared Memory Per Block",
        "Issue Slots Busy", "Executed Ipc Active", "L1/TEX Hit Rate", "Shared Memory")
seen = {}
for r in rows:
    key = (r["ID"], r["Kernel Name"].split("(")[0])
    name = r["Metric Name"]
    if any(name.startswith(w) for w in want) or "Bank" in name or "Stall" in name or "Pipe" in name:
        seen.setdefault(key, []).append(f'{r["Section Name"]} / {name}: {r["Metric Value"]} {r["Metric Unit"]}')
for (id_, kernel), lines in seen.items():
    print(f"## launch {id_}: {kernel}")
    for line in lines:
        print("  " + line)
PY
