#!/usr/bin/env bash
# Durable submits acknowledged per second through the real listener of a fresh `sparkle up`
# (tiny model, no workers, rate limits off), at several queue depths; then the cost of
# /readyz and of a submit with many finished jobs in the database.
#
#   DEPTHS="0 10000 100000" REQUESTS=20000 CONCURRENCY=64 FINISHED=200000 bash bench/ingress.sh
#
# SPARKLE is the binary (default target/release/sparkle). The client runs on the same machine
# as the service, so both share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/service.sh
SPARKLE=${SPARKLE:-target/release/sparkle}
DEPTHS=${DEPTHS:-"0 10000 100000"}
REQUESTS=${REQUESTS:-20000}
CONCURRENCY=${CONCURRENCY:-64}
FINISHED=${FINISHED:-200000}

prepare_work "$SPARKLE"
discord_key="$work/discord.key"
public=$("$SPARKLE" bench ingress --url https://unused --key-file /dev/null --ca-file /dev/null \
  --discord-key-file "$discord_key" --print-discord-public-key)

data=
start() {
  data="$work/data-$RANDOM"
  start_service "$SPARKLE" "$data" SPARKLE_SCALER__MAX_WORKERS=0 \
    SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC=0 SPARKLE_GATEWAY__PER_KEY_REQUESTS_PER_SEC=0 \
    SPARKLE_GATEWAY__MAX_LIVE_JOBS_PER_KEY=0 SPARKLE_QUEUE__MAX_QUEUED_JOBS=100000000 \
    SPARKLE_GATEWAY__MAX_CONNECTIONS_PER_IP=4096 \
    SPARKLE_DISCORD__PUBLIC_KEY="$public" SPARKLE_DISCORD__API_BASE=http://127.0.0.1:9 \
    SPARKLE_DISCORD__MAX_JOBS_PER_USER=0 SPARKLE_DISCORD__PER_GUILD_REQUESTS_PER_SEC=0 \
    RUST_LOG=warn
}
stop() { stop_service; }
bench() {
  "$SPARKLE" bench ingress --url "$url" --key-file "$work/key" --ca-file "$data/tls/cert.pem" \
    --discord-key-file "$discord_key" --concurrency "$CONCURRENCY" "$@"
}

for depth in $DEPTHS; do
  start
  bench --kind rest --preload "$depth" --requests "$REQUESTS"
  bench --kind discord --requests "$REQUESTS"
  stop
done

if [ "$FINISHED" -gt 0 ]; then
  start
  bench --kind rest --preload "$FINISHED" --requests 0 >/dev/null
  # As if a worker had run them all: every preloaded job succeeded a while ago.
  python3 - "$data/sparkle.db" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
now = int(time.time() * 1000)
db.execute("UPDATE jobs SET status = 'succeeded', images = 1, images_attempt = 1, attempts = 1, "
           "started_at = ?1 - 60000, finished_at = ?1 - 30000 WHERE status = 'queued'", (now,))
db.commit()
print("finished jobs:", db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'").fetchone()[0])
PY
  bench --kind readyz --requests "$REQUESTS"
  bench --kind rest --requests "$REQUESTS"
  stop
fi
