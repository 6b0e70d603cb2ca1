# Sourced by dev.sh and test.sh: make .venv and install the project (with extras) when
# pyproject.toml changed since the last install.
ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
    local stamp=".venv/.installed${extras:+-$extras}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        python -m pip install -q --upgrade pip
        python -m pip install -q -e ".${extras:+[$extras]}"
        touch "$stamp"
    fi
}
