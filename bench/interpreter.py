"""The interpreter the service runs on: what it is, how it was built, and a venv for another one.

``describe(python)`` asks the interpreter itself (its path, version, build) and the package
manager (which package installed it). Whether it is an optimized build:

- CPython's own build records it in ``sysconfig``: ``CONFIG_ARGS`` holds
  ``--enable-optimizations`` (PGO) and ``--with-lto`` (LTO), and an LTO build's
  ``CFLAGS_NODIST``/``LDFLAGS_NODIST`` hold ``-flto``. That is the signal used (pyenv,
  python.org, the Docker images, python-build-standalone all build this way).
- ``PGO_PROF_USE_FLAG`` is not a signal: ``configure`` sets it for any gcc build (the
  unoptimized pyenv 3.11.7 here has ``-fprofile-use -fprofile-correction``), and Debian's
  optimized build has it empty.
- Debian's packages build with PGO and LTO through their own rules and keep those flags out of
  ``_sysconfigdata`` (changelog of python3.8 3.8.0~b3-1: "Don't propagate lto flags to the
  _sysconfigdata module"), so for them ``sysconfig`` says nothing: the package is recorded and
  the build reported as "not recorded".

``ensure_venv(python)`` builds ``.venv-bench-<name>`` next to the project from the hash-locked
``requirements/dev.txt`` (as scripts/venv.sh does for .venv), rebuilt when the lock changes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "dev.txt"

# Run by the interpreter described: facts about itself, and a pure-Python loop's time (best
# of five) as a rough measure of how fast it runs Python code.
_PROBE = r"""
import json, os, platform, sys, sysconfig, timeit
cv = lambda name: str(sysconfig.get_config_var(name) or "")
args = cv("CONFIG_ARGS")
flags = " ".join(cv(n) for n in ("CFLAGS_NODIST", "LDFLAGS_NODIST", "PY_LDFLAGS_NODIST"))

def loop():
    counts = {}
    for i in range(100_000):
        key = i % 97
        counts[key] = counts.get(key, 0) + len(str(i))
    return counts

try:
    import psycopg
    psycopg_impl = psycopg.pq.__impl__
except ImportError:
    psycopg_impl = None
print(json.dumps({
    "executable": sys.executable,
    "base_executable": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
    "version": platform.python_version(),
    "implementation": platform.python_implementation(),
    "compiler": platform.python_compiler(),
    "config_pgo": "--enable-optimizations" in args,
    "config_lto": "--with-lto" in args or "-flto" in flags,
    "pgo_prof_use_flag": cv("PGO_PROF_USE_FLAG"),
    "psycopg": psycopg_impl,
    "loop_ms": round(min(timeit.repeat(loop, number=1, repeat=5)) * 1000, 1),
}))
"""


def describe(python: str) -> dict:
    """The interpreter at ``python`` (a venv's python describes its base interpreter)."""
    out = subprocess.run(
        [python, "-c", _PROBE], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    info = json.loads(out)
    package = _package(info["base_executable"])
    info["package"] = package
    if info["config_pgo"] or info["config_lto"]:
        info["pgo"], info["lto"] = info["config_pgo"], info["config_lto"]
        info["build"] = "sysconfig CONFIG_ARGS"
    elif package and package.startswith("python3"):
        # Debian's rules build with PGO+LTO and keep the flags out of sysconfig
        info["pgo"] = info["lto"] = None
        info["build"] = f"Debian package {package}: PGO+LTO by Debian's rules, not in sysconfig"
    else:
        info["pgo"] = info["lto"] = False
        info["build"] = "sysconfig CONFIG_ARGS (no --enable-optimizations, no --with-lto)"
    return info


def _package(path: str) -> str | None:
    """The Debian package that installed ``path`` (name and version), if any."""
    try:
        found = subprocess.run(
            ["dpkg-query", "-S", path], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:  # not a Debian system
        return None
    if found.returncode != 0:
        return None
    name = found.stdout.split(":", 1)[0].strip()
    version = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"{name} {version}".strip()


def venv_dir(python: str) -> Path:
    """``.venv-bench-<the interpreter's path as a name>`` in the project (gitignored)."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", os.path.realpath(python)).strip("-")
    return ROOT / f".venv-bench-{name}"


def ensure_venv(python: str, log=print) -> str:
    """A venv on ``python`` with the locked dependencies; returns its python. The project's
    code is not installed into it: the servers run from the project's folder."""
    venv = venv_dir(python)
    venv_python = venv / "bin" / "python"
    stamp = venv / ".installed-dev"
    if not venv_python.exists():
        log(f"creating {venv.name} on {python}")
        made = subprocess.run(
            [python, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            raise SystemExit(
                f"{python} -m venv failed (on Debian, apt-get install python3.X-venv; "
                f"bench/run.sh does):\n{made.stdout}{made.stderr}"
            )
    if not stamp.exists() or LOCK.stat().st_mtime > stamp.stat().st_mtime:
        log(f"installing {LOCK.relative_to(ROOT)} into {venv.name}")
        installed = subprocess.run(
            [str(venv_python), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(LOCK)],
            capture_output=True,
            text=True,
            check=False,
        )
        if installed.returncode != 0:
            raise SystemExit(f"pip install into {venv} failed:\n{installed.stderr[-3000:]}")
        stamp.touch()
    info = describe(str(venv_python))
    if info["psycopg"] != "binary":
        raise SystemExit(f"{venv.name}: psycopg runs as {info['psycopg']!r}, not its binary wheel")
    return str(venv_python)


if __name__ == "__main__":
    print(json.dumps(describe(sys.argv[1] if len(sys.argv) > 1 else sys.executable), indent=1))
