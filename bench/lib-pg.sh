# Sourced by bench/hbs-capacity and bench/failover-storm, after bench/lib-host.sh (its `at_exit` stops the server): a
# throwaway Postgres in a temp directory, Unix socket only, run as the postgres user when root (initdb and postgres
# refuse root). Sets DATABASE_URL; stopped on exit.
#   PG_OPTS adds server options (e.g. "-c log_lock_waits=on"); PG_KEEP_LOG=file keeps the server's log there.
pg_bin=${TETHER_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
pg_root=$(mktemp -d /tmp/tether-bench-pg.XXXXXX)
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --user-group --no-create-home postgres
    chown postgres: "$pg_root"
fi
chmod 755 "$pg_root"
pg_stop() {
    as_pg "$pg_bin/pg_ctl" -D "$pg_root/data" -m immediate -w stop >/dev/null 2>&1 || true
    [ -z "${PG_KEEP_LOG:-}" ] || cp "$pg_root/postgres.log" "$PG_KEEP_LOG" || true
    rm -rf "$pg_root"
}
at_exit pg_stop
as_pg mkdir -p "$pg_root/run"
as_pg "$pg_bin/initdb" -D "$pg_root/data" -U postgres --auth=trust --no-locale -E UTF8 -N >/dev/null
as_pg ${PG_TASKSET:-} "$pg_bin/pg_ctl" -D "$pg_root/data" -l "$pg_root/postgres.log" -w \
    -o "-c listen_addresses= -k $pg_root/run -p 5432 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 ${PG_OPTS:-}" \
    start >/dev/null
export DATABASE_URL="postgres://postgres@localhost:5432/postgres?host=$pg_root/run"
