"""The headline report: tables (markdown) and plots (PNG) from `python -m benchmarks.headline` result lines
(`tidal.bench.headline.run_point`).

`write_report(files, folder)` reads every JSONL line (later lines of the same arm and point replace
earlier ones) and writes into `folder`:
- `attainment_<family>.png`: SLO attainment vs offered rate, one panel per regime, one line per
  arm (Poisson points), and `goodput_<family>.png`: goodput per GPU the same way;
- `square_<arm>.png` for each square-wave point: p99 ITL per window against the regimes' ITL
  targets, the arrivals, and the pool sizes the planner kept (workers by role, and its targets);
- `headline.md`: the capacity of each arm (highest Poisson rate with >= 90% attainment at the
  balanced SLO), the burstiness sweep, and every point.
It returns the markdown.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tidal.bench.metrics import SLO_REGIMES  # noqa: E402

CAPACITY_ATTAINMENT_PCT = 90.0


def load_rows(files: list[str]) -> list[dict]:
    rows: dict[tuple[str, str], dict] = {}
    for path in files:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "point" in row:
                    rows[(row["arm"], row["point"])] = row
    return list(rows.values())


def _poisson(rows: list[dict], family: str) -> dict[str, list[dict]]:
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["family"] == family and row["bench"].get("arrival") in ("poisson", "replay"):
            by_arm[row["arm"]].append(row)
    return {arm: sorted(points, key=lambda r: r["rate"]) for arm, points in sorted(by_arm.items())}


def capacity(points: list[dict], regime: str = "balanced") -> float | None:
    """The highest offered rate whose attainment is at least 90% (None: none is)."""
    good = [r["rate"] for r in points if r["regimes"][regime]["attainment_pct"] >= CAPACITY_ATTAINMENT_PCT]
    return max(good) if good else None


def plot_vs_rate(rows: list[dict], family: str, key: str, ylabel: str, path: Path) -> Path | None:
    by_arm = _poisson(rows, family)
    if not by_arm:
        return None
    fig, axes = plt.subplots(1, len(SLO_REGIMES), figsize=(5 * len(SLO_REGIMES), 4), sharey=True)
    for ax, (regime, slo) in zip(axes, SLO_REGIMES.items()):
        for arm, points in by_arm.items():
            ax.plot([r["rate"] for r in points], [r["regimes"][regime][key] for r in points], marker="o", label=arm)
        if key == "attainment_pct":
            ax.axhline(CAPACITY_ATTAINMENT_PCT, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"{regime}: TTFT {slo['ttft_ms']:g} ms, ITL {slo['itl_ms']:g} ms (P90)")
        ax.set_xlabel(f"offered {family} arrivals/s")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_square(row: dict, path: Path) -> Path:
    windows = row["windows"]
    width = row.get("window_s", 5.0)
    mid = [w["t"] + width / 2 for w in windows]
    fig, (ax, load, pools) = plt.subplots(3, 1, figsize=(9, 8), sharex=True,
                                          gridspec_kw={"height_ratios": [2, 1, 1]})
    ax.plot(mid, [float("nan") if w["itl_ms_p99"] is None else w["itl_ms_p99"] for w in windows], marker="o",
            label="ITL p99")
    ax.plot(mid, [float("nan") if w["ttft_ms_p90"] is None else w["ttft_ms_p90"] for w in windows], marker=".",
            label="TTFT p90")
    for regime, slo in SLO_REGIMES.items():
        ax.axhline(slo["itl_ms"], linestyle="--", linewidth=0.8, color="gray")
        ax.text(mid[-1] if mid else 0, slo["itl_ms"], f" ITL {regime}", fontsize=7, va="bottom", ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    ax.set_title(f"{row['arm']}: {row['point']} ({row['rate']:.2f} /s calm)")
    load.bar(mid, [w["arrivals_per_s"] for w in windows], width=width * 0.9,
             color="gray", alpha=0.4)
    load.set_ylabel("arrivals/s")
    times = [s["t"] for s in row["pools"]]
    roles = sorted({role for s in row["pools"] for role in s["workers"]})
    for role in roles:
        pools.step(times, [s["workers"].get(role, 0) for s in row["pools"]], where="post", label=role)
    for role in sorted({role for s in row["pools"] for role in s["targets"]}):
        pools.step(times, [s["targets"].get(role) for s in row["pools"]], where="post", linestyle=":",
                   label=f"target {role}")
    pools.set_ylabel("workers")
    pools.set_xlabel("time since start (s)")
    if roles:
        pools.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def tables(rows: list[dict]) -> str:
    lines = ["## Capacity (highest Poisson rate with >= 90% attainment at the balanced SLO)", "",
             "| family | arm | GPUs | capacity (/s) | per GPU | rates tried |", "|---|---|---|---|---|---|"]
    for family in sorted({r["family"] for r in rows}):
        for arm, points in _poisson(rows, family).items():
            cap = capacity(points)
            gpus = points[0]["gpus"]
            lines.append(f"| {family} | {arm} | {gpus} | {_num(cap)} | {_num(cap / gpus if cap else None)} | "
                         + ", ".join(f"{r['rate']:.2f}" for r in points) + " |")
    lines += burstiness(rows)
    regimes = list(SLO_REGIMES)
    head = " | ".join(f"{g} att % / goodput/GPU" for g in regimes)
    lines += ["", "## Every point", "", f"| arm | point | rate /s | requests (cut, err) | {head} | TTFT p90 ms | "
              "ITL p99 ms | worst stall p99 ms |", "|---|---|---|---|" + "---|" * len(regimes) + "---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["point"], r["arm"])):
        cells = " | ".join(f"{_pct(r['regimes'][g]['attainment_pct'])} / {_num(r['regimes'][g]['goodput_per_gpu'])}"
                           for g in regimes)
        lines.append(f"| {r['arm']} | {r['point']} | {r['rate']:.2f} | {r['requests']} ({r['unfinished']}, "
                     f"{r['errors'] + r['rejected']}) | {cells} | {_num(r['ttft_ms']['p90'], 0)} | "
                     f"{_num(r['itl_ms']['p99'], 1)} | {_num(r['worst_stall_ms']['p99'], 0)} |")
    cards = sorted({", ".join(r["hardware"].get("cards", ["cpu"])) for r in rows if "hardware" in r})
    lines += where_time_went(rows)
    lines += ["", f"Devices: {'; '.join(cards) or '-'}. Dates: "
              + ", ".join(sorted({r['hardware']['date'] for r in rows if 'hardware' in r}))]
    return "\n".join(lines)


def burstiness(rows: list[dict]) -> list[str]:
    """Chat at one mean rate, gamma shapes k (1 = Poisson): balanced attainment and goodput per GPU."""
    cells: dict[str, dict[float, dict]] = defaultdict(dict)
    for r in rows:
        if r["family"] == "chat" and r["bench"].get("arrival") in ("poisson", "gamma") and r["load"] == 1.0:
            cells[r["arm"]][r["bench"].get("burstiness", 1.0)] = r
    shapes = sorted({k for by_k in cells.values() for k in by_k}, reverse=True)
    if not shapes:
        return []
    lines = ["", "## Burstiness (chat at 1.0x, gamma arrivals of shape k; balanced SLO: attainment % / goodput "
             "per GPU)", "", "| arm | " + " | ".join(f"k={k:g}" for k in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    for arm, by_k in sorted(cells.items()):
        lines.append(f"| {arm} | " + " | ".join(
            f"{_pct(by_k[k]['regimes']['balanced']['attainment_pct'])} / "
            f"{_num(by_k[k]['regimes']['balanced']['goodput_per_gpu'])}" if k in by_k else "-" for k in shapes) + " |")
    return lines


def write_report(files: list[str], folder: str) -> str:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(files)
    written = []
    for family in sorted({r["family"] for r in rows}):
        written.append(plot_vs_rate(rows, family, "attainment_pct", "SLO attainment (%)",
                                    out / f"attainment_{family}.png"))
        written.append(plot_vs_rate(rows, family, "goodput_per_gpu", "goodput per GPU (req/s)",
                                    out / f"goodput_{family}.png"))
    for row in rows:
        if row["bench"].get("arrival") == "square":
            written.append(plot_square(row, out / f"square_{row['arm']}.png"))
    text = tables(rows) + "\n\nPlots: " + ", ".join(str(p) for p in written if p) + "\n"
    (out / "headline.md").write_text(text)
    return text


def where_time_went(rows: list[dict]) -> list[str]:
    """Per point that recorded it (`engines`): each worker's busy share, CPU, step time, decode
    batch, tokens/s and KV pulls over the measured window, and the frontend process's CPU."""
    rows = [r for r in rows if r.get("engines", {}).get("workers")]
    if not rows:
        return []
    lines = ["", "## Where the time went (measured window; busy = engine step time / wall, CPU 1.0 = one core)", "",
             "| arm | point | frontend CPU | worker | role | busy | CPU | step ms | decode batch | running | "
             "prefill tok/s | output tok/s | pulls/s | pull ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["point"], r["arm"])):
        e = r["engines"]
        for i, (wid, w) in enumerate(sorted(e["workers"].items())):
            lead = f"| {r['arm']} | {r['point']} | {_num(e.get('frontend_cpu'))} |" if i == 0 else "| | | |"
            lines.append(f"{lead} {wid} | {w['role']} | {_num(w['busy'])} | {_num(w.get('cpu'))} | "
                         f"{_num(w['step_ms'], 1)} | {_num(w['decode_batch'], 1)} | {_num(w.get('num_running_mean'), 1)} | "
                         f"{w['prefill_tok_s']} | {w['output_tok_s']} | {_num(w['pulls_per_s'])} | {_num(w['pull_ms'], 1)} |")
    return lines

