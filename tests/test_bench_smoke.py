"""The benchmark's command still works: a few seconds per scenario against its own throwaway
PostgreSQL, every figure present, no failed request, sessions bounded; the floors, the
interpreter and the lists as history grows (a small history) are in the JSON and the report;
the keyed creates send what they say (a new key each time, or a retry answered from the
stored answer). Figures are not judged here (the benchmark is for that: docs/benchmarks.md,
docs/retries.md)."""

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CREATES = ("admin-create", "admin-create-keyed", "admin-create-replay")
SCENARIOS = ("poll", "churn", "admin-list", *CREATES)
FLOORS = ("floor", "floor-django", "floor-django-pooled", "floor-asgi")
LISTS = ("admin-list", "admin-list-open", "admin-search")


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
        "--scale",
        "3000",
        "--list-concurrency",
        "4",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    data = json.loads(out.read_text())
    seeded = [r for r in data["results"] if r["grown_to"] == 0]
    runs = {(r["scenario"], r["target"]): r for r in seeded}
    expected = (
        {(f, "floor") for f in FLOORS}
        | {(s, t) for s in SCENARIOS for t in ("service", "limit", "own-sql")}
        | {(s, "service") for s in LISTS}
    )
    assert set(runs) == expected
    for run in data["results"]:
        key = (run["scenario"], run["target"], run["grown_to"])
        assert run["requests"] > 0, key
        assert run["rps"] > 0, key
        assert run["non2xx"] == 0, (key, run)
        assert run["p50_ms"] <= run["p99_ms"], (key, run)
        assert run["interpreter"] == "default", key
        if run["target"] in ("service", "floor"):
            # sampled in both workers while they served: at least the event loop's thread
            assert len(run["threads_peak"]) == 2, (key, run)
            assert min(run["threads_peak"]) >= 1, (key, run)
            assert run["app_cpu_ms_per_request"] > 0, (key, run)
        else:
            assert run["threads_peak"] is None, (key, run)
    for scenario in SCENARIOS:
        service = runs[(scenario, "service")]
        assert 1 <= service["pg_sessions_peak"] <= 2 * 3, service  # workers x pool size

    # no key, or a new one each time: nothing replayed; one key per connection: everything
    # but each connection's first request (4 connections) answered from the stored answer
    assert [runs[(s, "service")]["replayed"] for s in CREATES[:2]] == [0, 0]
    replay = runs[("admin-create-replay", "service")]
    assert replay["requests"] - replay["replayed"] == 4, replay
    # what a key costs: the advisory lock, the key's read, a savepoint and its release around
    # the effect, the key's row (token check included; tests/test_hot_paths.py counts the rest)
    assert data["statements"] == {
        "poll": 2,
        "admin-list": 3,
        "admin-create": 5,
        "admin-create-keyed": 10,
        "admin-create-replay": 5,
    }

    # the lists again on the grown history, with the search as selective as at the start
    grown = {r["scenario"] for r in data["results"] if r["grown_to"] == 3000}
    assert grown == {"poll", "churn", *LISTS}
    assert [m["grown_to"] for m in data["search"]["matches"]] == [0, 3000]
    for match in data["search"]["matches"]:
        assert 0.001 <= match["matching"] / match["tickets"] <= 0.01, match

    default = data["interpreters"]["default"]
    assert default["version"] == platform.python_version()
    assert Path(default["base_executable"]).exists()
    assert default["psycopg"] == "binary"
    assert {"pgo", "lto", "build", "loop_ms"} <= set(default)

    report = out.with_suffix(".md").read_text()
    assert "### Against the ceilings" in report
    assert all(f"| {s} | 4 |" in report for s in SCENARIOS)
    assert "### Retries: a keyed create beside an unkeyed one" in report
    assert all(f"| {s} | 4 | {data['statements'][s]} | " in report for s in CREATES)
    assert "### The floors" in report
    assert "| default | 4 | " in report  # the ratios' row
    assert f"`{default['base_executable']}`" in report
    assert "### Lists at scale" in report
    assert all(f"| {s} | 4 | " in report for s in LISTS)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_a_run_measured_in_rounds_is_reported_by_its_median_round():
    """--rounds: each headline run is reported by the round with the median req/s (a run
    as measured, in the first round's place) and the range of all rounds; the runs outside
    the rounds (lists at scale, another interpreter's) are kept as they are."""
    from bench import report

    def row(scenario, rps, round_, **more):
        return {"scenario": scenario, "target": "service", "concurrency": 16, "rps": rps,
                "p99_ms": rps / 10, "round": round_, **more}  # fmt: skip

    results = [
        row("admin-create", 300, 0),
        row("admin-create-keyed", 100, 0),
        row("admin-create", 100, 1),
        row("admin-create-keyed", 150, 1),
        row("admin-create", 200, 2),
        row("admin-create-keyed", 120, 2),
        row("admin-create", 999, None),  # not a round: e.g. a list at scale
        row("admin-create", 50, 0, interpreter="/usr/bin/python3.11"),
    ]
    reduced = report.median_rounds(results)
    assert [(r["scenario"], r["rps"], r.get("rounds_rps")) for r in reduced] == [
        ("admin-create", 200, [300, 100, 200]),
        ("admin-create-keyed", 120, [100, 150, 120]),
        ("admin-create", 999, None),
        ("admin-create", 50, None),
    ]
    assert reduced[0]["p99_ms"] == 20  # the median round's own figures, not a blend
    assert report._rounds(reduced[0]) == " (100-300)"
    assert report._rounds(reduced[2]) == ""
    # an even number of rounds: the lower middle one, a run as measured
    two = report.median_rounds([row("poll", 10, 0), row("poll", 30, 1)])
    assert [(r["rps"], r["rounds_rps"]) for r in two] == [(10, [10, 30])]
