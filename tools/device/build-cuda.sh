#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), what the lent GPU machine runs: the CUDA build of
# `sparkle` and the engine's test executable with the CUDA tests, both packed with xz into
# .carry/bin/ (git-ignored; pass `carry: [".carry"]` to the device call).
#   bash tools/device/build-cuda.sh
# The CUDA toolchain comes from ../shared/gpu/cuda-env.sh; the build keeps its own target
# directory (target-cuda), since a cold one takes half an hour on two cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source ../shared/gpu/cuda-env.sh >/dev/null
export CARGO_TARGET_DIR=target-cuda CARGO_PROFILE_RELEASE_DEBUG=false
mkdir -p .carry/bin
cargo build --release --features cuda -p sparkle
tests=$(cargo test --release --features cuda -p sparkle-engine --lib --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sparkle_engine":
        print(m["executable"])' | tail -1)
[ -n "$tests" ] || { echo "no engine test executable was built" >&2; exit 1; }
xz -T2 -6 -c target-cuda/release/sparkle > .carry/bin/sparkle.xz
xz -T2 -6 -c "$tests" > .carry/bin/engine-tests.xz
ls -la .carry/bin
