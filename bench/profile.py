"""Where a uvicorn worker's time goes under load: py-spy samples, summed per function.

``record(pid, seconds)`` runs ``py-spy record --format raw`` on one worker and returns the
functions seen in the most samples (inclusive: a function counts when it is anywhere on the
stack), as shares of all samples of that worker, threads included. Waiting inside psycopg for
PostgreSQL's answer shows as ``Connection.wait``.
"""

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Frames that are on every stack and say nothing about the request's work.
_PLUMBING = (
    "threading.py",
    "concurrent/futures",
    "asyncio/",
    "multiprocessing/",
    "uvicorn/_subprocess",
    "uvicorn/server.py",
    "uvicorn/supervisors",
    "uvicorn/_compat",
    "<module>",
    "sync.py",  # asgiref's wrappers around every hop
)


# Always listed: waiting for PostgreSQL, the pool's liveness check, Django's per-request thread.
_ALWAYS = ("Connection.wait ", "ConnectionPool.check_connection", "ThreadSensitiveContext")


def record(pid: int, seconds: float, rate: int = 200) -> list[dict]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                out.name,
                "--nonblocking",
            ],
            capture_output=True,
            check=True,
        )
        return summarize(Path(out.name).read_text())


def summarize(raw: str, top: int = 25) -> list[dict]:
    total = 0
    inclusive: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        for frame in set(stack.split(";")):
            name = _name(frame)
            if name and (name.startswith(_ALWAYS) or not any(p in frame for p in _PLUMBING)):
                inclusive[name] += n
    if not total:
        return []
    rows, last = [], None
    for name, n in inclusive.most_common():
        share = round(n / total, 3)
        ours = "(support/" in name or "(project/" in name or name.startswith(_ALWAYS)
        # a chain of wrappers shares one figure: keep its first frame, and all of ours
        if ours or last is None or abs(share - last) > 0.005:
            rows.append({"function": name, "share": share})
            last = share
        if len(rows) == top:
            break
    return rows


def _name(frame: str) -> str:
    """'func (path/to/module.py:12)' -> 'func (package/module.py)'."""
    if " (" not in frame:
        return frame.strip()
    func, where = frame.split(" (", 1)
    path = where.split(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    else:
        for package in ("/support/", "/project/"):
            if package in path:
                path = path[path.rfind(package) + 1 :]
    return f"{func} ({path})"
