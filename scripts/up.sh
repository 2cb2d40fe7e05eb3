#!/usr/bin/env bash
# Builds Sparkle and starts it on the embedded defaults: SQLite queue, local image store,
# local worker processes, HTTPS with a self-signed certificate on https://127.0.0.1:8443.
# Without MODEL set, a tiny random-weight model is made first (it draws noise, fast, on a CPU);
# point MODEL at a diffusers-layout SD 1.5 / 2.1 checkpoint for real images.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "Rust is needed: https://rustup.rs" >&2; exit 1; }
cargo build --release --bin sparkle
BIN=target/release/sparkle
MODEL=${MODEL:-models/tiny}
if [ ! -d "$MODEL" ]; then
  "$BIN" model tiny "$MODEL"
fi
exec "$BIN" up --model "$MODEL" "$@"
