"""The benchmark's report: markdown tables into docs/benchmarks.md, and the PNG plot.

``python -m bench.report [docs/benchmarks.json]`` rewrites them from a saved run. The
generated part of docs/benchmarks.md sits between two markers; the prose around it is kept.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
TARGETS = {"poll": 0.16, "churn": 0.14, "admin-list": 0.40, "admin-create": 0.14}
# the keyed creates have no target of their own: they are read against the unkeyed create
CREATES = ("admin-create", "admin-create-keyed", "admin-create-replay")
SCENARIOS = ("poll", "churn", "admin-list", *CREATES)
FLOORS = {  # scenario: what serves it (bench/floors.py)
    "floor": "service (`/bench/floor/`, the whole stack)",
    "floor-django": "Django, default handler",
    "floor-django-pooled": "Django, pooled handler (`project.handler`)",
    "floor-asgi": "bare ASGI app",
}
LISTS = ("admin-list", "admin-list-open", "admin-search")


def write(data: dict, json_path: Path) -> None:
    """The plot and the markdown next to the JSON (docs/benchmarks.{png,md} for the default)."""
    data = {**data, "results": median_rounds(data["results"])}
    png, doc = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    plot(data, png)
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{tables(data, png.name)}\n{END}{tail}")


def median_rounds(results: list[dict]) -> list[dict]:
    """One row per headline run measured in several rounds (``--rounds``): the round with
    the median req/s (the lower middle one of an even number), a run as measured, with
    ``rounds_rps``: every round's req/s. It stands where the first round stood; rows of
    one round, or of no round, are kept as they are."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("round") is not None:
            key = (r["scenario"], r["target"], r["concurrency"], r.get("interpreter", "default"))
            groups.setdefault(key, []).append(r)
    out = []
    for r in results:
        if r.get("round") is None:
            out.append(r)
            continue
        group = groups[
            (r["scenario"], r["target"], r["concurrency"], r.get("interpreter", "default"))
        ]
        if len(group) == 1:
            out.append(r)
        elif r is group[0]:
            ranked = sorted(group, key=lambda g: g["rps"])
            out.append({**ranked[(len(ranked) - 1) // 2], "rounds_rps": [g["rps"] for g in group]})
    return out


def _rounds(r: dict) -> str:
    """' (min-max)' of the rounds' req/s, when there were several."""
    if len(spread := r.get("rounds_rps") or []) < 2:
        return ""
    return f" ({min(spread):,.0f}-{max(spread):,.0f})"


def _find(results, scenario, target, concurrency, first_tickets=True):
    rows = [
        r
        for r in results
        if r["scenario"] == scenario and r["target"] == target and r["concurrency"] == concurrency
    ]
    return rows[0] if rows and first_tickets else (rows if rows else None)


def _default(results: list[dict]) -> list[dict]:
    """The runs on the default interpreter (all of them in runs before --python existed)."""
    return [r for r in results if r.get("interpreter", "default") == "default"]


def _threads(r: dict) -> str:
    """The peak thread count of each worker, e.g. '12 / 11'."""
    return " / ".join(str(n) for n in r.get("threads_peak") or []) or "-"


def _build(info: dict) -> str:
    if info["pgo"] is None:
        return "PGO+LTO (Debian's build)"
    return " + ".join(name for name in ("PGO", "LTO") if info[name.lower()]) or "neither"


def tables(data: dict, png_name: str) -> str:
    everything = data["results"]
    results = _default(everything)
    s = data["settings"]
    m = data["machine"]
    python = f"Python {m['python']}"
    if info := data.get("interpreters", {}).get("default"):
        python += f" (`{info['base_executable']}`, optimized build: {_build(info)})"
    out = [
        f"Run of {data['date']} at commit `{data['commit']}` on {m['cores']} cores "
        f"({m['cpu']}), {python}, PostgreSQL {s['postgresql']} "
        f"({s['postgresql_settings']}). Service: {s['workers']} uvicorn workers, pool of "
        f"{s['pool_size_per_worker']} connections per worker, LOG_LEVEL={s['log_level']}. "
        f"{s['duration_s']:g} s per measured run after {s['warmup_s']:g} s of warm-up"
        + (
            f", {s['rounds']} rounds (every scenario once per round; each figure from the "
            "round with the median req/s, the range of all rounds in brackets); "
            if s.get("rounds", 1) > 1
            else "; "
        )
        + f"{s['agents']} agents, {s['open_tickets']:,} open tickets. "
        f"Whole run: {data['elapsed_s'] // 60} min {data['elapsed_s'] % 60} s.",
        "",
        "### Against the ceilings",
        "",
        "| scenario | conn | service req/s | p50 / p90 / p99 ms | non-2xx | limit req/s | "
        "limit p99 ms | own SQL req/s | ÷ limit (target) | ÷ own SQL | p99 ÷ limit p99 | "
        "PG sessions | app CPU ms/req | threads / worker (peak) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    concurrencies = sorted({r["concurrency"] for r in results if r["target"] == "own-sql"})
    for scenario in SCENARIOS:
        for c in concurrencies:
            svc = _find(results, scenario, "service", c)
            lim = _find(results, scenario, "limit", c)
            own = _find(results, scenario, "own-sql", c)
            if not (svc and lim and own):
                continue
            ratio = svc["rps"] / lim["rps"] if lim["rps"] else 0
            p99 = svc["p99_ms"] / lim["p99_ms"] if lim["p99_ms"] else 0
            target = TARGETS.get(scenario)
            if target is None:
                against, p99_met = f"{ratio:.2f}", f"{p99:.1f}"
            else:
                met = "✅" if ratio >= target else "❌"
                against = f"{ratio:.2f} (≥ {target:.2f}) {met}"
                p99_met = f"{p99:.1f} {'✅' if p99 <= 4 else '❌'}"
            out.append(
                f"| {scenario} | {c} | {svc['rps']:,.0f}{_rounds(svc)} | {svc['p50_ms']:.1f} / "
                f"{svc['p90_ms']:.1f} / {svc['p99_ms']:.1f} | {svc['non2xx']} | "
                f"{lim['rps']:,.0f}{_rounds(lim)} | {lim['p99_ms']:.1f} | "
                f"{own['rps']:,.0f}{_rounds(own)} | "
                f"{against} | {svc['rps'] / own['rps']:.2f} | {p99_met} | "
                f"{svc['pg_sessions_peak']} | {svc['app_cpu_ms_per_request']:.2f} | "
                f"{_threads(svc)} |"
            )
    out += _retry_tables(data, results)
    out += _floor_tables(everything)
    out += _interpreter_tables(data)
    sweep = [
        r
        for r in results
        if r["scenario"] in ("poll", "churn")
        and r["target"] in ("service", "limit")
        and _bucket(r["tickets"]) == 0
    ]
    if len({r["concurrency"] for r in sweep}) > 2:
        out += [
            "",
            "### Concurrency sweep",
            "",
            f"![requests/s and p99 against concurrency]({png_name})",
            "",
            "| scenario | conn | service req/s | service p99 ms | limit req/s | limit p99 ms "
            "| ÷ limit | PG sessions (service) | threads / worker (peak) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for scenario in ("poll", "churn"):
            for c in sorted({r["concurrency"] for r in sweep}):
                svc = _first(sweep, scenario, "service", c)
                lim = _first(sweep, scenario, "limit", c)
                if svc and lim:
                    out.append(
                        f"| {scenario} | {c} | {svc['rps']:,.0f} | {svc['p99_ms']:.1f} | "
                        f"{lim['rps']:,.0f} | {lim['p99_ms']:.1f} | "
                        f"{svc['rps'] / lim['rps']:.2f} | {svc['pg_sessions_peak']} | "
                        f"{_threads(svc)} |"
                    )
    for scenario, prof in data.get("profiles", {}).items():
        out += [
            "",
            f"### Profile: `{scenario}`, {prof['concurrency']} connections",
            "",
            f"py-spy, {prof['seconds']:g} s on one of the two workers "
            f"({prof['rps_while_sampled']} req/s while sampled). Share of the worker's "
            "samples with the function anywhere on the stack (chains of wrappers shown "
            "once):",
            "",
            "| share | function |",
            "|---:|---|",
        ]
        out += [f"| {row['share']:.1%} | `{row['function']}` |" for row in prof["top"]]
    scale = _scale_rows(results)
    if scale:
        out += [
            "",
            "### Scale: the same work as history grows",
            "",
            "| scenario | conn | tickets in the table | service req/s | p50 / p99 ms | "
            "÷ its figure at the smallest table (target ≥ 0.80) | limit req/s |",
            "|---|---:|---:|---:|---|---|---:|",
        ]
        out += scale
    out += _list_tables(data)
    return "\n".join(out)


def _retry_tables(data: dict, results: list[dict]) -> list[str]:
    """The keyed create and its replay beside the unkeyed create, at each concurrency."""
    creates = [r for r in results if r["scenario"] in CREATES and not r.get("grown_to")]
    if not any(r["scenario"] != CREATES[0] for r in creates):
        return []
    statements = data.get("statements", {})
    out = [
        "",
        "### Retries: a keyed create beside an unkeyed one",
        "",
        "`admin-create`: `POST /api/tickets/` without a key; `admin-create-keyed`: the same "
        "with a new `Idempotency-Key` on every request; `admin-create-replay`: one key per "
        "connection and the same body every time, so that after the connection's first "
        "request every answer is the stored one (`Idempotent-Replayed: true`, counted in "
        "*replayed*). Same run, same database, same server. *Statements*: those one request "
        "sends, the token check included (the pool's liveness check on checkout comes on top, "
        "alike for all). *÷ unkeyed*: against `admin-create` at the same concurrency.",
        "",
        "| scenario | conn | statements | req/s | ÷ unkeyed | p50 / p90 / p99 ms | "
        "p99 ÷ unkeyed | app CPU ms/req | ÷ unkeyed | replayed | limit req/s | ÷ unkeyed "
        "| own SQL req/s | ÷ unkeyed |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def per(a: dict | None, b: dict | None, field: str, digits: str = ".2f") -> str:
        if not (a and b and b[field]):
            return "-"
        return format(a[field] / b[field], digits)

    for c in sorted({r["concurrency"] for r in creates}):
        base = {t: _first(creates, CREATES[0], t, c) for t in ("service", "limit", "own-sql")}
        for scenario in CREATES:
            svc = _first(creates, scenario, "service", c)
            if not svc:
                continue
            lim = _first(creates, scenario, "limit", c)
            own = _first(creates, scenario, "own-sql", c)
            cpu, replayed = svc["app_cpu_ms_per_request"], svc.get("replayed")
            out.append(
                f"| {scenario} | {c} | {statements.get(scenario, '-')} | "
                f"{svc['rps']:,.0f}{_rounds(svc)} | "
                f"{per(svc, base['service'], 'rps')} | {svc['p50_ms']:.1f} / "
                f"{svc['p90_ms']:.1f} / {svc['p99_ms']:.1f} | "
                f"{per(svc, base['service'], 'p99_ms')} | "
                f"{'-' if cpu is None else format(cpu, '.2f')} | "
                f"{per(svc, base['service'], 'app_cpu_ms_per_request')} | "
                f"{'-' if replayed is None else format(replayed, ',')} | "
                f"{format(lim['rps'], ',.0f') + _rounds(lim) if lim else '-'} | "
                f"{per(lim, base['limit'], 'rps')} | "
                f"{format(own['rps'], ',.0f') + _rounds(own) if own else '-'} | "
                f"{per(own, base['own-sql'], 'rps')} |"
            )
    return out


def _floor_tables(results: list[dict]) -> list[str]:
    """Each floor at each concurrency and interpreter, and the ratios the targets use."""
    floors = [r for r in results if r["scenario"] in FLOORS]
    if not floors:
        return []
    out = [
        "",
        "### The floors: a request that does nothing (no database)",
        "",
        'Each answers `GET /bench/floor/` with `{"ok": true}` under uvicorn as the service is '
        "served (same workers, lifespan off, no uvicorn access log); `bench/floors.py`.",
        "",
        "| floor | interpreter | conn | req/s | p50 / p90 / p99 ms | app CPU ms/req "
        "| threads / worker (peak) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    interpreters = list(dict.fromkeys(r.get("interpreter", "default") for r in floors))
    concurrencies = sorted({r["concurrency"] for r in floors})
    for python in interpreters:
        for c in concurrencies:
            for scenario, label in FLOORS.items():
                r = _run(floors, scenario, c, python)
                if r:
                    out.append(
                        f"| {label} | {python} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.1f} / "
                        f"{r['p90_ms']:.1f} / {r['p99_ms']:.1f} | "
                        f"{r['app_cpu_ms_per_request']:.2f} | {_threads(r)} |"
                    )
    out += [
        "",
        "| interpreter | conn | service floor ÷ Django floor (req/s) | its app CPU ÷ | "
        "Django pooled ÷ default handler (req/s) | its app CPU ÷ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for python in interpreters:
        for c in concurrencies:
            django = _run(floors, "floor-django", c, python)
            cells = [
                _ratio(_run(floors, "floor", c, python), django),
                _ratio(_run(floors, "floor-django-pooled", c, python), django),
            ]
            out.append(f"| {python} | {c} | " + " | ".join(cells) + " |")
    return out


def _run(rows, scenario, c, python="default", target=None):
    """The first run of ``scenario`` at ``c`` connections on ``python``."""
    for r in rows:
        if (
            r["scenario"] == scenario
            and r["concurrency"] == c
            and r.get("interpreter", "default") == python
            and (target is None or r["target"] == target)
        ):
            return r
    return None


def _ratio(a: dict | None, b: dict | None) -> str:
    """'a ÷ b' of requests/s, and of app CPU per request, as two cells."""
    if not (a and b and b["rps"]):
        return "- | -"
    cpu = "-"
    if a["app_cpu_ms_per_request"] and b["app_cpu_ms_per_request"]:
        cpu = f"{a['app_cpu_ms_per_request'] / b['app_cpu_ms_per_request']:.2f}"
    return f"{a['rps'] / b['rps']:.2f} | {cpu}"


def _interpreter_tables(data: dict) -> list[str]:
    interpreters = data.get("interpreters") or {}
    if not interpreters:
        return []
    out = [
        "",
        "### The interpreter",
        "",
        "| run | interpreter | version | optimized build | how it is known | "
        "pure-Python loop ms (best of 5) |",
        "|---|---|---|---|---|---:|",
    ]
    for label, info in interpreters.items():
        out.append(
            f"| {label} | `{info['base_executable']}` | {info['version']} | {_build(info)} | "
            f"{info['build']} | {info['loop_ms']:.1f} |"
        )
    results = data["results"]
    for label in interpreters:
        if label == "default":
            continue
        out += [
            "",
            f"On `{label}` (a venv of its own from `requirements/dev.txt`), the same runs "
            "without the ceilings, beside the default interpreter's:",
            "",
            "| scenario | conn | default req/s | this req/s | ÷ default | app CPU ms/req "
            "(default / this) | p99 ms (default / this) | threads / worker (this) |",
            "|---|---:|---:|---:|---:|---|---|---:|",
        ]
        for r in results:
            if r.get("interpreter") != label:
                continue
            base = _run(results, r["scenario"], r["concurrency"], "default", r["target"])
            if not base:
                continue
            out.append(
                f"| {r['scenario']} | {r['concurrency']} | {base['rps']:,.0f} | "
                f"{r['rps']:,.0f} | {r['rps'] / base['rps']:.2f} | "
                f"{base['app_cpu_ms_per_request']:.2f} / {r['app_cpu_ms_per_request']:.2f} | "
                f"{base['p99_ms']:.1f} / {r['p99_ms']:.1f} | {_threads(r)} |"
            )
    return out


def _list_tables(data: dict) -> list[str]:
    """The admin lists at each history size (--scale), against their figure at the seeded
    size measured just before the history grew."""
    results = [
        r for r in _default(data["results"]) if r["scenario"] in LISTS and r["target"] == "service"
    ]
    if not any(r.get("grown_to") for r in results):
        return []
    search = data["search"]
    matches = ", ".join(
        f"{m['matching']:,} of {m['tickets']:,} ({m['matching'] / m['tickets']:.2%})"
        for m in search["matches"]
    )
    out = [
        "",
        "### Lists at scale: the admin lists as history grows",
        "",
        f"`admin-list`: `GET /api/tickets/?page_size=20`; `admin-list-open`: `?status=open`; "
        f"`admin-search`: `?search={search['term']}` (an error code in the seeded "
        f"descriptions), which matched {matches} tickets.",
        "",
        "| scenario | conn | tickets in the table | req/s | p50 / p99 ms | app CPU ms/req | "
        "÷ its figure at the seeded size |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for scenario in LISTS:
        for c in sorted({r["concurrency"] for r in results}):
            runs = [r for r in results if r["scenario"] == scenario and r["concurrency"] == c]
            seeded = [r for r in runs if not r.get("grown_to")]
            grown = [r for r in runs if r.get("grown_to")]
            if not (seeded and grown):
                continue
            base = seeded[-1]  # the one measured right before the history grew
            for r in [base, *grown]:
                out.append(
                    f"| {scenario} | {c} | {r['tickets']:,} | {r['rps']:,.0f} | "
                    f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
                    f"{r['app_cpu_ms_per_request']:.2f} | {r['rps'] / base['rps']:.2f} |"
                )
    return out


def _first(rows, scenario, target, c):
    for r in rows:
        if r["scenario"] == scenario and r["target"] == target and r["concurrency"] == c:
            return r
    return None


def _scale_rows(results) -> list[str]:
    rows = []
    sizes = sorted({r["tickets"] // 10_000 for r in results if r["target"] == "service"})
    if len(sizes) < 2:
        return rows
    for scenario in ("poll", "churn"):
        for c in sorted({r["concurrency"] for r in results if r["target"] == "own-sql"}):
            runs = [
                r
                for r in results
                if r["scenario"] == scenario and r["target"] == "service" and r["concurrency"] == c
            ]
            limits = [
                r
                for r in results
                if r["scenario"] == scenario and r["target"] == "limit" and r["concurrency"] == c
            ]
            # the first run at a size is the main one; the sweep reuses the smallest size
            by_size: dict[int, dict] = {}
            for r in runs:
                by_size.setdefault(_bucket(r["tickets"]), r)
            lim_by_size: dict[int, dict] = {}
            for r in limits:
                lim_by_size.setdefault(_bucket(r["tickets"]), r)
            if len(by_size) < 2:
                continue
            base = by_size[min(by_size)]
            for size in sorted(by_size):
                r = by_size[size]
                ratio = r["rps"] / base["rps"]
                met = "✅" if ratio >= 0.8 else "❌"
                lim = lim_by_size.get(size)
                lim_rps = f"{lim['rps']:,.0f}" if lim else "-"
                rows.append(
                    f"| {scenario} | {c} | {r['tickets']:,} | {r['rps']:,.0f} | "
                    f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {ratio:.2f} {met} | {lim_rps} |"
                )
    return rows


def _bucket(tickets: int) -> int:
    """Runs on the seeded table (grown a little by churn) share a bucket; each scale its own."""
    for size in (1_000_000, 200_000):
        if tickets >= size * 0.9:
            return size
    return 0


def plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in _default(data["results"]) if _bucket(r["tickets"]) == 0]
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    # poll and churn over the sweep; a run without one (e.g. --scenarios of the creates
    # alone, --sweep ""): every scenario measured, at its concurrencies
    swept = {r["concurrency"] for r in results if r["scenario"] in ("poll", "churn")}
    drawn = ("poll", "churn") if len(swept) > 2 else SCENARIOS
    styles = {}
    for i, scenario in enumerate(drawn):
        color = f"C{i}"
        styles[scenario, "service"] = (color, "-")
        styles[scenario, "limit"] = (color, "--")
    for (scenario, target), (color, line) in styles.items():
        points = {}
        for r in results:
            if r["scenario"] == scenario and r["target"] == target:
                points.setdefault(r["concurrency"], r)
        if len(points) < 2:
            continue
        xs = sorted(points)
        label = f"{scenario} {'service' if target == 'service' else 'limit (pgbench)'}"
        ax_rps.plot(xs, [points[x]["rps"] for x in xs], line, color=color, marker="o", label=label)
        ax_p99.plot(
            xs, [points[x]["p99_ms"] for x in xs], line, color=color, marker="o", label=label
        )
    for ax, title in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_p99.set_yscale("log")
    ax_rps.set_yscale("log")  # the service and its ceiling differ by an order of magnitude
    if ax_rps.get_legend_handles_labels()[0]:  # a run of one concurrency draws no line
        ax_rps.legend(fontsize=8)
    fig.suptitle(f"2 uvicorn workers vs. pgbench, same machine ({data['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "benchmarks.json"
    write(json.loads(path.read_text()), path)
