#!/usr/bin/env bash
# Runs every test: unit tests, the queue conformance suite, and end-to-end tests that start
# the real binary on loopback with the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 is needed by the end-to-end tests" >&2; exit 1; }
cargo test --workspace --locked -- --test-threads 2
