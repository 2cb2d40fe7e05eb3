#!/usr/bin/env bash
# Runs every test: unit tests, the queue conformance suite against SQLite and against a real
# PostgreSQL (a throwaway server started here by scripts/postgres.sh, TLS on), and
# end-to-end tests that start the real binary on loopback with the tiny model and speak to
# it with real clients (reqwest, the official `openai` Python package, and the Standard
# Webhooks reference library `standardwebhooks`, installed here into target/).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 is needed by the end-to-end tests" >&2; exit 1; }
venv=target/test-python
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, standardwebhooks" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3" "standardwebhooks>=1.0,<2"
fi
export OPENAI_CLIENT_PYTHON=$PWD/$venv/bin/python
# One database server for the whole run; every test works in a schema or database of its own.
pg_dir=$(mktemp -d /tmp/sparkle-test-pg.XXXXXX)
trap 'scripts/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true; rm -rf "$pg_dir"' EXIT
settings=$(scripts/postgres.sh start "$pg_dir")
while IFS='=' read -r name value; do
  export "$name=$value"
done <<<"$settings"
cargo test --workspace --locked -- --test-threads 2
