#!/usr/bin/env bash
# Many open event streams on one gateway: what they cost the gateway (CPU) and the database
# (statements per second) while nothing happens to the job they follow.
#
#   STREAMS=1000 SECS=20 bash bench/event-streams.sh
#
# SERVER is the `sparkle` that serves (default target/release/sparkle); CLIENT the one whose
# `sparkle bench streams` opens the streams (default: the same). To measure another build of
# the server, point SERVER at it and set NEW_SETTINGS=0 if it predates the stream caps.
# The service runs on the tiny model with no workers, so the one job stays queued.
# Two runs: one counts CPU with normal logging, one counts statements from sqlx's statement
# log (which itself costs CPU, so it is not timed).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/service.sh
SERVER=${SERVER:-target/release/sparkle}
CLIENT=${CLIENT:-$SERVER}
STREAMS=${STREAMS:-1000}
SECS=${SECS:-20}
NEW_SETTINGS=${NEW_SETTINGS:-1}

prepare_work "$CLIENT"

ticks() { # user + system CPU ticks of a process
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# One run: starts the service with RUST_LOG=$1, opens the streams, and prints
# "<cpu seconds> <statements>" over the SECS-second window.
run() {
  local log_filter=$1 data="$work/data-$RANDOM"
  local -a env=(
    SPARKLE_SCALER__MAX_WORKERS=0
    SPARKLE_GATEWAY__MAX_CONNECTIONS=$((STREAMS + 64))
    SPARKLE_GATEWAY__MAX_CONNECTIONS_PER_IP=$((STREAMS + 64))
    SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC=0
    SPARKLE_GATEWAY__PER_KEY_REQUESTS_PER_SEC=0
    RUST_LOG="$log_filter"
  )
  if [ "$NEW_SETTINGS" = 1 ]; then
    env+=(SPARKLE_GATEWAY__MAX_EVENT_STREAMS=$((STREAMS + 64))
          SPARKLE_GATEWAY__MAX_EVENT_STREAMS_PER_KEY=$((STREAMS + 64)))
  fi
  start_service "$SERVER" "$data" "${env[@]}"
  local job
  job=$(curl -sS --cacert "$data/tls/cert.pem" "$url/v1/jobs" -H "Authorization: Bearer $key" \
    -H 'Content-Type: application/json' -d '{"prompt": "a queued corgi", "size": "64x64", "steps": 2}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  "$CLIENT" bench streams --url "$url" --key-file "$work/key" --ca-file "$data/tls/cert.pem" \
    --job "$job" --streams "$STREAMS" --secs $((SECS + 4)) >"$work/client" 2>&1 &
  local client=$!
  until grep -q '^holding' "$work/client" 2>/dev/null; do
    kill -0 "$client" 2>/dev/null || { cat "$work/client" >&2; exit 1; }
    sleep 0.2
  done
  sleep 2
  local t0 q0 t1 q1
  t0=$(ticks "$pid"); q0=$(grep -c 'sqlx::query' "$work/log" || true)
  sleep "$SECS"
  t1=$(ticks "$pid"); q1=$(grep -c 'sqlx::query' "$work/log" || true)
  wait "$client"
  grep -E '^(opened|events)' "$work/client" >&2
  stop_service
  local hz
  hz=$(getconf CLK_TCK)
  echo "$(( (t1 - t0) )) $hz $(( q1 - q0 ))"
}

read -r cpu hz _ < <(run "info,sqlx=warn")
read -r _ _ statements < <(run "info,sqlx=warn,sqlx::query=debug")
awk -v c="$cpu" -v hz="$hz" -v q="$statements" -v s="$SECS" -v n="$STREAMS" 'BEGIN {
  printf "%d streams, %d s: gateway CPU %.1f%% of one core, %.1f database statements/s\n",
    n, s, 100 * c / hz / s, q / s }'
