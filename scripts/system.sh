# Sourced by test.sh and bench/run.sh: Debian packages they need, installed when missing.

# apt_install [--no-install-recommends] PACKAGE...
apt_install() {
    echo "Installing with apt-get: $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL's server binaries (initdb, pg_ctl, pgbench) for the throwaway clusters; as root,
# a cluster runs as the postgres user (PostgreSQL refuses to run as root).
ensure_postgresql() {
    if ! command -v pg_ctl >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
        apt_install postgresql
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home postgres
    fi
}
