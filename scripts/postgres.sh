#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for tests: a fresh cluster in DIR on a free loopback port, TLS on
# with a certificate from a test CA made here, password (SCRAM) logins over TLS only, and the
# two roles of a deployment: `sparkle_owner` owns the database (migrations), `sparkle_app`
# may only read and write rows (the service).
#
#   scripts/postgres.sh start DIR   prints the settings to use, as shell assignments:
#                                   TEST_PG_URL and ..._PASSWORD_FILE (owner),
#                                   TEST_PG_APP_URL and ..._APP_PASSWORD_FILE,
#                                   TEST_PG_CA_FILE
#   scripts/postgres.sh stop DIR
#
# For failover tests, a streaming standby beside a primary started as above:
#
#   scripts/postgres.sh standby DIR STANDBY_DIR   a standby of DIR's server, replicating
#                                   synchronously (DIR's commits wait for it, so a promotion
#                                   loses nothing acknowledged); prints TEST_PG_STANDBY_PORT
#   scripts/postgres.sh kill DIR    stops DIR's server at once (pg_ctl -m immediate: a crash)
#   scripts/postgres.sh resume DIR  starts it again (crash recovery)
#   scripts/postgres.sh promote DIR makes DIR's standby the primary (pg_ctl promote)
#
# And for credential rotation, as an agent rotating passwords or tokens would:
#
#   scripts/postgres.sh rotate DIR  gives `sparkle_app` a new password, writes it to its
#                                   password file (atomically), and ends the role's open
#                                   sessions: every connection from then on logs in anew
#
# The server listens on 127.0.0.1, or on the address in SPARKLE_TEST_HOST (for a test that
# puts the database on a network of its own), and takes logins from the networks it is on.
# The server runs as the `postgres` user (initdb refuses root); DIR is made for it.
set -euo pipefail
command=${1:-}
dir=${2:-}
host=${SPARKLE_TEST_HOST:-127.0.0.1}
usage() { sed -n '2,29p' "$0" >&2; exit 2; }
[ -n "$command" ] && [ -n "$dir" ] || usage

bin=
for candidate in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
  [ -x "$candidate/initdb" ] && { bin=$candidate; break; }
done
[ -n "$bin" ] || { echo "PostgreSQL's initdb was not found under /usr/lib/postgresql" >&2; exit 1; }

as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$command" in
start)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  tls="$dir/tls"
  mkdir -p "$tls"
  # The test CA, and the server's certificate for its address and localhost.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=Sparkle test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,DNS:localhost\n' "$host" >"$tls/ext.cnf"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 30 -extfile "$tls/ext.cnf" -out "$tls/server.pem" 2>/dev/null
  rm -f "$tls/ca.key" "$tls/server.csr" "$tls/ext.cnf"
  chmod 600 "$tls/server.key"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres "$dir"
  fi
  as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=reject \
    -E UTF8 >/dev/null
  cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '$host'
port = $port
unix_socket_directories = '$dir'
ssl = on
ssl_cert_file = '$tls/server.pem'
ssl_key_file = '$tls/server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
max_connections = 200
fsync = on
CONF
  cat >"$dir/data/pg_hba.conf" <<HBA
local     all all                trust
local     replication all        trust
hostssl   all all samenet    scram-sha-256
HBA
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
  secrets="$dir/secrets"
  mkdir -p "$secrets"
  chown "$(id -u)" "$secrets"
  chmod 700 "$secrets"
  owner_password=$(openssl rand -hex 16)
  app_password=$(openssl rand -hex 16)
  (umask 077; printf '%s\n' "$owner_password" >"$secrets/owner.password"
   printf '%s\n' "$app_password" >"$secrets/app.password")
  as_postgres "$bin/psql" -h "$dir" -p "$port" -U postgres -q -v ON_ERROR_STOP=1 <<SQL
CREATE ROLE sparkle_owner LOGIN PASSWORD '$owner_password';
CREATE ROLE sparkle_app LOGIN PASSWORD '$app_password';
CREATE DATABASE sparkle_test OWNER sparkle_owner;
\\connect sparkle_test
ALTER SCHEMA public OWNER TO sparkle_owner;
GRANT USAGE ON SCHEMA public TO sparkle_app;
ALTER DEFAULT PRIVILEGES FOR ROLE sparkle_owner
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO sparkle_app;
ALTER DEFAULT PRIVILEGES FOR ROLE sparkle_owner
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO sparkle_app;
SQL
  echo "TEST_PG_URL=postgres://sparkle_owner@$host:$port/sparkle_test"
  echo "TEST_PG_PASSWORD_FILE=$secrets/owner.password"
  echo "TEST_PG_APP_URL=postgres://sparkle_app@$host:$port/sparkle_test"
  echo "TEST_PG_APP_PASSWORD_FILE=$secrets/app.password"
  echo "TEST_PG_CA_FILE=$tls/ca.pem"
  ;;
stop)
  if [ -d "$dir/data" ]; then
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
  ;;
standby)
  standby=${3:-}
  [ -n "$standby" ] || usage
  dir=$(cd "$dir" && pwd)
  port=$(sed -n 's/^port = //p' "$dir/data/postgresql.conf" | tail -1)
  mkdir -p "$standby"
  standby=$(cd "$standby" && pwd)
  standby_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$standby"
  fi
  chmod 700 "$standby"
  # A copy of the primary taken over its replication protocol, on its own port and socket,
  # streaming from the primary under a name the primary waits for.
  as_postgres "$bin/pg_basebackup" -h "$dir" -p "$port" -U postgres -D "$standby/data" \
    -X stream -c fast
  cat >>"$standby/data/postgresql.conf" <<CONF
port = $standby_port
unix_socket_directories = '$standby'
primary_conninfo = 'host=$dir port=$port user=postgres application_name=sparkle_standby'
synchronous_standby_names = ''
hot_standby = on
CONF
  as_postgres touch "$standby/data/standby.signal"
  as_postgres "$bin/pg_ctl" -D "$standby/data" -l "$standby/server.log" -w start >/dev/null
  printf "synchronous_standby_names = 'sparkle_standby'\n" >>"$dir/data/postgresql.conf"
  as_postgres "$bin/pg_ctl" -D "$dir/data" reload >/dev/null
  for _ in $(seq 1 100); do
    state=$(as_postgres "$bin/psql" -h "$dir" -p "$port" -U postgres -At -c \
      "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'sparkle_standby'")
    [ "$state" = sync ] && break
    sleep 0.1
  done
  [ "$state" = sync ] || { echo "the standby did not start replicating synchronously" >&2; exit 1; }
  echo "TEST_PG_STANDBY_PORT=$standby_port"
  ;;
kill)
  as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
  ;;
resume)
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
  ;;
promote)
  as_postgres "$bin/pg_ctl" -D "$dir/data" -w promote >/dev/null
  ;;
rotate)
  dir=$(cd "$dir" && pwd)
  port=$(sed -n 's/^port = //p' "$dir/data/postgresql.conf" | tail -1)
  password=$(openssl rand -hex 16)
  (umask 077; printf '%s\n' "$password" >"$dir/secrets/app.password.new")
  mv "$dir/secrets/app.password.new" "$dir/secrets/app.password"
  as_postgres "$bin/psql" -h "$dir" -p "$port" -U postgres -q -At -v ON_ERROR_STOP=1 <<SQL >/dev/null
ALTER ROLE sparkle_app PASSWORD '$password';
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'sparkle_app';
SQL
  ;;
*)
  usage
  ;;
esac
