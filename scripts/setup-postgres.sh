#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages, starts a private cluster on a free port under /tmp,
# creates a user and database for the ledger tests, and prints the line to export.
#
#   eval "$(sudo bash scripts/setup-postgres.sh | tail -n 1)"
#
# Idempotent: a second run reuses the installed packages and the running cluster.
# Run as root on Debian. Everything but the final `export` line goes to stderr.
set -euo pipefail

DATA_DIR=${TESSERA_PG_DIR:-/tmp/tessera-postgres}
PORT=${TESSERA_PG_PORT:-55432}
DB_USER=${TESSERA_PG_USER:-tessera}
DB_PASSWORD=${TESSERA_PG_PASSWORD:-tessera}
DB_NAME=${TESSERA_PG_DB:-tessera}

log() { echo "setup-postgres: $*" >&2; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing postgresql from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends postgresql >&2
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

# PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ ! -f "$DATA_DIR/PG_VERSION" ]; then
    log "initialising cluster in $DATA_DIR"
    mkdir -p "$DATA_DIR"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA_DIR"
    as_postgres "$BIN/initdb" -D "$DATA_DIR" -U postgres --auth=trust -E UTF8 >&2
fi

if ! as_postgres "$BIN/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1; then
    log "starting cluster on port $PORT"
    as_postgres "$BIN/pg_ctl" -D "$DATA_DIR" -l "$DATA_DIR/server.log" -w start \
        -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=400" >&2
fi

psql_admin() { as_postgres "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != 1 ]; then
    log "creating role $DB_USER"
    psql_admin -d postgres -c "CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD'"
fi
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
    log "creating database $DB_NAME"
    psql_admin -d postgres -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
fi

echo "export TESSERA_TEST_POSTGRES_URL=postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:$PORT/$DB_NAME"
