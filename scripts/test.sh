#!/usr/bin/env bash
# Runs every test: unit tests, the queue conformance suite against SQLite and against a real
# PostgreSQL (a throwaway server started here by scripts/postgres.sh, TLS on), images in an
# S3-compatible bucket (moto's server, started by scripts/s3.sh, TLS on), and
# end-to-end tests that start the real binary on loopback with the tiny model and speak to
# it with real clients (reqwest, the official `openai` Python package, and the Standard
# Webhooks reference library `standardwebhooks`, installed here into target/), schemathesis
# against /openapi.json, and the web page in headless Chromium (Debian's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 is needed by the end-to-end tests" >&2; exit 1; }
venv=target/test-python
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, standardwebhooks, moto.server, flask_cors, schemathesis" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3" "standardwebhooks>=1.0,<2" \
    "moto[server]>=5,<6" "schemathesis>=4.30,<5"
fi
# The browser test drives Debian's Chromium through chromedriver (no browser download).
if ! command -v chromedriver >/dev/null || [ ! -x /usr/bin/chromium ]; then
  sudo=
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export OPENAI_CLIENT_PYTHON=$PWD/$venv/bin/python
# One database server and one S3 server for the whole run; every test works in a schema,
# database or key prefix of its own.
pg_dir=$(mktemp -d /tmp/sparkle-test-pg.XXXXXX)
s3_dir=$(mktemp -d /tmp/sparkle-test-s3.XXXXXX)
trap 'scripts/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true; scripts/s3.sh stop "$s3_dir" || true; rm -rf "$pg_dir" "$s3_dir"' EXIT
settings=$(scripts/postgres.sh start "$pg_dir")
settings+=$'\n'$(scripts/s3.sh start "$s3_dir" "$venv/bin/python")
while IFS='=' read -r name value; do
  export "$name=$value"
done <<<"$settings"
cargo test --workspace --locked -- --test-threads 2
