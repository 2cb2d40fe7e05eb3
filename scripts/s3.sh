#!/usr/bin/env bash
# A throwaway S3-compatible server for tests: moto's server (from PyPI, in the test
# environment's Python) on a free loopback port, over TLS with a certificate from a test CA
# made here, with one bucket.
#
#   scripts/s3.sh start DIR PYTHON   prints the settings to use, as shell assignments:
#                                    TEST_S3_ENDPOINT, TEST_S3_BUCKET, TEST_S3_REGION,
#                                    TEST_S3_CA_FILE, TEST_S3_CREDENTIALS_FILE
#   scripts/s3.sh stop DIR
#
# PYTHON is an interpreter with `moto[server]` and boto3 installed (scripts/test.sh makes one).
# The server listens on 127.0.0.1, or on the address in SPARKLE_TEST_HOST.
set -euo pipefail
command=${1:-}
dir=${2:-}
[ -n "$command" ] && [ -n "$dir" ] || { sed -n '2,12p' "$0" >&2; exit 2; }
host=${SPARKLE_TEST_HOST:-127.0.0.1}
case "$command" in
start)
  python=${3:?the Python with moto[server]}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=Sparkle test S3 CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,DNS:localhost\n' "$host" >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 30 -extfile "$dir/ext.cnf" -out "$dir/server.pem" 2>/dev/null
  rm -f "$dir/ca.key" "$dir/server.csr" "$dir/ext.cnf"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$python" -m moto.server -H "$host" -p "$port" -c "$dir/server.pem" -k "$dir/server.key" \
    >"$dir/server.log" 2>&1 &
  echo $! >"$dir/pid"
  (umask 077; printf '[default]\naws_access_key_id = sparkletest\naws_secret_access_key = %s\n' \
    "$(openssl rand -hex 16)" >"$dir/credentials")
  endpoint="https://$host:$port"
  for _ in $(seq 1 100); do
    if "$python" - "$endpoint" "$dir/ca.pem" <<'PY' 2>/dev/null
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], verify=sys.argv[2], region_name="us-east-1",
                  aws_access_key_id="sparkletest", aws_secret_access_key="x")
s3.create_bucket(Bucket="sparkle-test")
PY
    then
      echo "TEST_S3_ENDPOINT=$endpoint"
      echo "TEST_S3_BUCKET=sparkle-test"
      echo "TEST_S3_REGION=us-east-1"
      echo "TEST_S3_CA_FILE=$dir/ca.pem"
      echo "TEST_S3_CREDENTIALS_FILE=$dir/credentials"
      exit 0
    fi
    sleep 0.2
  done
  echo "moto's server did not start:" >&2
  cat "$dir/server.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
  fi
  ;;
*)
  sed -n '2,11p' "$0" >&2
  exit 2
  ;;
esac
