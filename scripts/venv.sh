# Sourced by dev.sh and test.sh: make .venv and install the pinned dependencies of one lock file
# (requirements/prod.txt or requirements/dev.txt, with hashes; scripts/lock.sh writes them) and
# the project itself, when the lock file or pyproject.toml changed since the last install.
ensure_venv() {
    local lock="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
    local stamp=".venv/.installed-$(basename "$lock" .txt)"
    if [ ! -f "$stamp" ] || [ "$lock" -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        python -m pip install -q --require-hashes -r "$lock"
        python -m pip install -q --no-deps -e .
        touch "$stamp"
    fi
}
