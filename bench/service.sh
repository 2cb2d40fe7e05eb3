# Sourced by the benchmark scripts: a fresh `sparkle up` on loopback with the tiny model, for
# the length of one measurement.
#
#   prepare_work BINARY                              a scratch $work (removed on exit, with any
#                                                    service still running) and $work/model
#   start_service BINARY DATA_DIR [NAME=VALUE ...]   sets $pid, $url and $key ($work/key holds it)
#   stop_service

prepare_work() {
  work=$(mktemp -d)
  pid=
  trap 'cleanup_work' EXIT
  "$1" model tiny "$work/model" >/dev/null
}

cleanup_work() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}

start_service() {
  local binary=$1 data=$2
  shift 2
  env "$@" "$binary" up --data-dir "$data" --listen 127.0.0.1:0 \
    --admin-listen 127.0.0.1:0 --model "$work/model" >"$work/out" 2>"$work/log" &
  pid=$!
  url=
  for _ in $(seq 1 300); do
    url=$(sed -n 's/^Sparkle is up at //p' "$work/out")
    [ -n "$url" ] && break
    sleep 0.1
  done
  [ -n "$url" ] || { echo "the service did not start:" >&2; cat "$work/log" >&2; exit 1; }
  key=$(sed -n 's/^Admin API key (shown once; only its hash is stored): //p' "$work/out")
  (umask 077; printf '%s' "$key" >"$work/key")
}

stop_service() {
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
}
