# Shared by scripts/dev.sh and scripts/test.sh: make sure PostgreSQL is installed and, for
# tests, that a server is reachable. Sourced, not run.

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $*"; return 1; fi
}

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ] && { pg_config --bindir; return 0; }
    return 1
}

# Installs PostgreSQL's server binaries from Debian's packages when they are missing.
ensure_postgres_installed() {
    if pg_bindir >/dev/null; then return 0; fi
    log "PostgreSQL not found; installing it with apt-get"
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql postgresql-contrib >&2
    pg_bindir >/dev/null || { log "PostgreSQL installation failed"; return 1; }
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Prints a URL of a reachable PostgreSQL server for the tests: $DATABASE_URL when set, else
# the server on 127.0.0.1:5432 (started, and installed, when it is not running).
ensure_test_database_url() {
    if [ -n "${TEST_DATABASE_URL:-}" ]; then echo "$TEST_DATABASE_URL"; return 0; fi
    if [ -n "${DATABASE_URL:-}" ]; then echo "$DATABASE_URL"; return 0; fi
    if ! tcp_open 127.0.0.1 5432; then
        ensure_postgres_installed
        if command -v pg_lsclusters >/dev/null && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
            local ver name
            read -r ver name _ < <(pg_lsclusters -h | head -n1)
            log "starting PostgreSQL cluster $ver/$name"
            { as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start || as_root pg_ctlcluster "$ver" "$name" start; } >&2
        elif command -v pg_createcluster >/dev/null; then
            local ver
            ver=$(basename "$(dirname "$(pg_bindir)")")
            log "creating PostgreSQL cluster $ver/main"
            as_root pg_createcluster "$ver" main --start >&2
        else
            log "no PostgreSQL cluster tooling found; set DATABASE_URL to a reachable server"
            return 1
        fi
        for _ in $(seq 1 30); do tcp_open 127.0.0.1 5432 && break; sleep 1; done
    fi
    # Trust auth (as on CI machines) needs no password; a stock Debian install asks for one
    # over TCP, so give the postgres role a local-only password in that case.
    local url="postgres://postgres@127.0.0.1:5432/postgres"
    if command -v psql >/dev/null && ! PGCONNECT_TIMEOUT=3 psql "$url" -Atqc 'select 1' >/dev/null 2>&1; then
        if ! PGCONNECT_TIMEOUT=3 psql "postgres://postgres:postgres@127.0.0.1:5432/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
            log "setting a password for the local postgres role (tests connect over TCP)"
            as_root runuser -u postgres -- psql -qc "ALTER ROLE postgres PASSWORD 'postgres'" >/dev/null
        fi
        url="postgres://postgres:postgres@127.0.0.1:5432/postgres"
    fi
    echo "$url"
}

# Prints a URL of a reachable Redis for the tests (the Redis rate-limit backend): $TEST_REDIS_URL
# when set, else 127.0.0.1:6379, installing and starting redis-server when it is missing.
ensure_test_redis_url() {
    if [ -n "${TEST_REDIS_URL:-}" ]; then echo "$TEST_REDIS_URL"; return 0; fi
    if ! tcp_open 127.0.0.1 6379; then
        if ! command -v redis-server >/dev/null; then
            log "Redis not found; installing it with apt-get"
            as_root apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >&2
        fi
        log "starting redis-server on 127.0.0.1:6379"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --dir /tmp --logfile /tmp/keymeter-test-redis.log >/dev/null
        for _ in $(seq 1 30); do tcp_open 127.0.0.1 6379 && break; sleep 0.2; done
    fi
    echo "redis://127.0.0.1:6379/"
}

# The TLS tests (tests/api/db_tls.rs) need the test server to offer TLS. Debian's server is
# set up with ssl = on and the "snakeoil" certificate of the ssl-cert package; a cluster made
# without it, or with ssl turned off, gets it switched on here: ALTER SYSTEM + reload, no
# restart (PostgreSQL reloads its ssl settings since 10). Only for a server on this machine
# (its data directory is here): the certificate files must be where the server runs.
# Idempotent: a server that already offers TLS is left as it is.
ensure_test_postgres_ssl() {
    local url=$1 ssl datadir owner
    command -v psql >/dev/null || { log "psql not found; not checking the server's ssl setting"; return 0; }
    ssl=$(PGCONNECT_TIMEOUT=5 psql "$url" -Atqc 'SHOW ssl' 2>/dev/null) || {
        log "cannot ask the test server whether ssl is on; the TLS tests may fail"; return 0; }
    [ "$ssl" = on ] && return 0
    datadir=$(psql "$url" -Atqc 'SHOW data_directory')
    if ! as_root test -d "$datadir"; then
        log "the test server has ssl = off and is not on this machine: turn ssl on there for the TLS tests"
        return 0
    fi
    local cert=/etc/ssl/certs/ssl-cert-snakeoil.pem key=/etc/ssl/private/ssl-cert-snakeoil.key
    if [ ! -r "$cert" ] || ! as_root test -r "$key"; then
        if ! command -v make-ssl-cert >/dev/null; then
            log "installing Debian's ssl-cert (the snakeoil certificate)"
            as_root apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq ssl-cert >&2
        fi
        as_root make-ssl-cert generate-default-snakeoil >&2
    fi
    # The server reads its key as its own user and refuses a key others can read. Debian's
    # postgres user reads the snakeoil key through the ssl-cert group, but a server set up
    # otherwise may not be in it (and a new group needs a restart), so the server gets its
    # own copy, owned by it, mode 0600, in its data directory. The certificate stays where it
    # is: it is public, and the tests read it to learn the name and CA to verify.
    owner=$(as_root stat -c %U "$datadir")
    as_root install -o "$owner" -m 600 "$key" "$datadir/keymeter-test-server.key"
    log "turning ssl on in the test PostgreSQL (snakeoil certificate)"
    psql "$url" -qX -v ON_ERROR_STOP=1 \
        -c "ALTER SYSTEM SET ssl_cert_file = '$cert'" \
        -c "ALTER SYSTEM SET ssl_key_file = '$datadir/keymeter-test-server.key'" \
        -c "ALTER SYSTEM SET ssl = on" \
        -c "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 1 20); do
        [ "$(psql "$url" -Atqc 'SHOW ssl')" = on ] && return 0
        sleep 0.25
    done
    log "ssl is still off after the reload: see the PostgreSQL server log"
    return 1
}

# The console's browser tests (tests/api/console.rs) drive Debian's chromium through
# chromedriver (the chromium-driver package); both are installed when missing.
ensure_test_browser() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return 0; fi
    log "chromium or chromedriver not found; installing them with apt-get (console browser tests)"
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium chromium-driver >&2
    command -v chromedriver >/dev/null || { log "chromium-driver installation failed"; return 1; }
}
