"""The benchmark's command still works: a few seconds per scenario against its own throwaway
PostgreSQL, every figure present, no failed request, sessions bounded. Figures are not judged
here (the benchmark is for that: docs/benchmarks.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("poll", "churn", "admin-list", "admin-create")


def test_the_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "bench.run",
        "--quick",
        "--concurrency",
        "4",
        "--agents",
        "8",
        "--open-tickets",
        "2000",
        "--pool-size",
        "3",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    data = json.loads(out.read_text())
    runs = {(r["scenario"], r["target"]): r for r in data["results"]}
    expected = {("floor", "floor")} | {
        (s, t) for s in SCENARIOS for t in ("service", "limit", "own-sql")
    }
    assert set(runs) == expected
    for key, run in runs.items():
        assert run["requests"] > 0, key
        assert run["rps"] > 0, key
        assert run["non2xx"] == 0, (key, run)
        assert run["p50_ms"] <= run["p99_ms"], (key, run)
    for scenario in SCENARIOS:
        service = runs[(scenario, "service")]
        assert 1 <= service["pg_sessions_peak"] <= 2 * 3, service  # workers x pool size
        assert service["app_cpu_ms_per_request"] > 0
    report = out.with_suffix(".md").read_text()
    assert "### Against the ceilings" in report
    assert all(f"| {s} | 4 |" in report for s in SCENARIOS)
    assert out.with_suffix(".png").stat().st_size > 1000
