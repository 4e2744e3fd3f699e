#!/usr/bin/env bash
# Throwaway PostgreSQL for tests and benchmarks. Source this file, then call `pg_start`:
# it sets DATABASE_URL to a fresh server in a temp directory (run as a non-root user, since
# PostgreSQL refuses to run as root) and arranges `pg_stop` on exit. If DATABASE_URL is
# already set, it is used as is and nothing is started.

pg_start() {
  if [ -n "${DATABASE_URL:-}" ]; then
    echo "postgres: using DATABASE_URL from the environment"
    return 0
  fi
  local bin
  if ! command -v initdb >/dev/null 2>&1 && [ ! -x /usr/lib/postgresql/15/bin/initdb ] \
     && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "postgres: server binaries missing, installing them with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || true
  fi
  for bin in initdb pg_ctl postgres; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/lib/postgresql/15/bin/$bin" ]; then
      echo "postgres: '$bin' not found; install the PostgreSQL server (apt-get install postgresql)" >&2
      return 1
    fi
  done
  export PATH="$PATH:/usr/lib/postgresql/15/bin"
  local run_as=()
  if [ "$(id -u)" = 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
      useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres || return 1
    fi
    run_as=(runuser -u postgres --)
  fi
  PG_TMP=$(mktemp -d /tmp/cqrs-pg.XXXXXX)
  chmod 755 "$PG_TMP"
  [ "${#run_as[@]}" -gt 0 ] && chown postgres "$PG_TMP"
  PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
  "${run_as[@]}" initdb -D "$PG_TMP/data" -U postgres --auth=trust --encoding=UTF8 --no-instructions >"$PG_TMP/initdb.log" 2>&1 || {
    echo "postgres: initdb failed:" >&2; cat "$PG_TMP/initdb.log" >&2; return 1; }
  # Tests create many databases and connections; durability settings stay at their defaults
  # except synchronous_commit, which the append benchmark sets itself.
  "${run_as[@]}" pg_ctl -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_TMP -c max_connections=400 -c shared_buffers=256MB -c fsync=${PG_FSYNC:-off}" \
    start >/dev/null || { echo "postgres: server did not start:" >&2; cat "$PG_TMP/server.log" >&2; return 1; }
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  export PG_DATA_DIR="$PG_TMP/data"
  PG_RUN_AS="${run_as[*]}"
  PG_STARTED_HERE="$PG_TMP"
  trap pg_stop EXIT
  echo "postgres: started throwaway server at $DATABASE_URL"
}

pg_stop() {
  # Only a server this shell started: a PG_TMP inherited from the environment (a server that
  # someone else started and passed down with DATABASE_URL) is left alone.
  if [ -n "${PG_TMP:-}" ] && [ "${PG_STARTED_HERE:-}" = "$PG_TMP" ] && [ -d "$PG_TMP/data" ]; then
    ${PG_RUN_AS:-} pg_ctl -D "$PG_TMP/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$PG_TMP"
  fi
}
