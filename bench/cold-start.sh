#!/usr/bin/env bash
# Scale from zero to the first image, through the scaler of a fresh `sparkle up`: a job is
# submitted while no worker runs; the time to its image counts the scaler's decision, the
# worker process starting, the model loading onto the device and the generation. Then the
# same once more after the pool has gone back to zero (the weights now in the page cache),
# and a job for a worker already up, for comparison.
#
#   ARCH=sd1.5 FULL_SIZE=1 SIZE=512x512 STEPS=25 bash bench/cold-start.sh
#
# SPARKLE is the binary (default target/release/sparkle). FULL_SIZE=1 writes the real
# checkpoint's shapes (random weights, about 4 GB for SD 1.5); 0 the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/service.sh
SPARKLE=${SPARKLE:-target/release/sparkle}
ARCH=${ARCH:-sd1.5}
FULL_SIZE=${FULL_SIZE:-1}
SIZE=${SIZE:-512x512}
STEPS=${STEPS:-25}

prepare_work "$SPARKLE"
rm -rf "$work/model"
full=()
[ "$FULL_SIZE" = 1 ] && full=(--full-size)
"$SPARKLE" model tiny --arch "$ARCH" "${full[@]}" "$work/model" >/dev/null 2>&1
start_service "$SPARKLE" "$work/data" SPARKLE_SCALER__IDLE_GRACE_SECS=3 SPARKLE_SCALER__TICK_MS=200
metrics=$(sed -n 's/^Metrics at //p' "$work/out")
python3 - "$url" "$work/data/tls/cert.pem" "$work/key" "$metrics" "$SIZE" "$STEPS" <<'PY'
import json, ssl, sys, time, urllib.error, urllib.request
url, cert, key_file, metrics, size, steps = sys.argv[1:7]
key = open(key_file).read().strip()
ctx = ssl.create_default_context(cafile=cert)

def call(method, path, body=None):
    req = urllib.request.Request(url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            # Polling a long generation may meet the per-address request rate: wait as told.
            if e.code != 429:
                raise
            time.sleep(float(e.headers.get("Retry-After") or 0.1))

def workers():
    text = urllib.request.urlopen(metrics, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("sparkle_workers "):
            return float(line.split()[1])
    return 0.0

def one(label, seed):
    started = time.time()
    job = call("POST", "/v1/jobs", {"prompt": "a lighthouse at dusk", "size": size,
                                    "steps": int(steps), "seed": seed})
    while job["status"] in ("queued", "running"):
        time.sleep(0.05)
        job = call("GET", "/v1/jobs/" + job["id"])
    took = time.time() - started
    assert job["status"] == "succeeded", job
    print(f"{label}: {took:.2f} s from submit to the finished image")

def until_no_worker():
    deadline = time.time() + 120
    while workers() > 0:
        assert time.time() < deadline, "the pool never went back to zero"
        time.sleep(0.2)

until_no_worker()
one("from zero, weights read from disk", 1)
one("worker already up", 2)
until_no_worker()
one("from zero again, weights in the page cache", 3)
PY
# What the scaler and the workers said of each start.
grep -E "worker ready|model ready|worker started" "$work/log" | sed 's/\x1b\[[0-9;]*m//g' | tail -8
