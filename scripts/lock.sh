#!/usr/bin/env bash
# Pin every dependency, with hashes, from pyproject.toml's ranges (README: Dependencies).
#   bash scripts/lock.sh                  # re-pin after editing pyproject.toml; keeps other pins
#   bash scripts/lock.sh --upgrade        # every package to its newest release within the ranges
#   bash scripts/lock.sh -P django        # only this package (repeatable)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv-lock
if [ ! -x "$tools/bin/pip-compile" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q "pip-tools==7.6.2"
fi
# PyPI only (no local wheel folders or mirrors of this machine), so the hashes are PyPI's.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
compile() {
    "$tools/bin/pip-compile" -q --generate-hashes --allow-unsafe --strip-extras \
        --index-url https://pypi.org/simple --no-emit-index-url --no-emit-find-links "$@"
}
# The service alone (the Docker image, production); then the same pins plus the test and
# benchmark tools (scripts/test.sh, CI). The second is constrained by the first, so the service
# runs the same versions in both.
compile "$@" -o requirements/prod.txt pyproject.toml
compile "$@" --extra test --extra bench -c requirements/prod.txt -o requirements/dev.txt pyproject.toml
