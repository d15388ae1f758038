"""Plots of a bench run (PNG, matplotlib) and the side-by-side comparison of several runs.

- `timeline.png`: per window of `window_s`, TTFT p50/p99 and ITL p99 of the requests sent in it,
  with the offered load (requests sent per second) on a second axis;
- `cdf.png`: CDFs of TTFT and of every inter-token gap;
- `compare.png` (several runs): the same CDFs, one line per run, and a table on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tidal.bench.metrics import percentile  # noqa: E402


def load_records(folder: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "records.jsonl").read_text().splitlines() if line]


def _cdf(ax, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    xs = sorted(values_ms)
    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_run(folder: str | Path, window_s: float = 5.0) -> list[Path]:
    folder = Path(folder)
    records = load_records(folder)
    ok = [r for r in records if r["status"] == "ok"]
    end = max((r["sent_s"] for r in records), default=0.0)
    starts = [i * window_s for i in range(int(end // window_s) + 1)]
    series = {"TTFT p50": [], "TTFT p99": [], "ITL p99": []}
    offered = []
    for start in starts:
        sent = [r for r in records if start <= r["sent_s"] < start + window_s]
        done = [r for r in sent if r["status"] == "ok"]
        ttft = [r["ttft_s"] * 1e3 for r in done if r["ttft_s"] is not None]
        itl = [g * 1e3 for r in done for g in r["itl_s"]]
        series["TTFT p50"].append(percentile(ttft, 50))
        series["TTFT p99"].append(percentile(ttft, 99))
        series["ITL p99"].append(percentile(itl, 99))
        offered.append(len(sent) / window_s)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, ys in series.items():
        ax.plot([s + window_s / 2 for s in starts], [float("nan") if y is None else y for y in ys], marker="o",
                label=label)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    load = ax.twinx()
    load.bar([s + window_s / 2 for s in starts], offered, width=window_s * 0.9, alpha=0.15, color="gray",
             label="offered (req/s)")
    load.set_ylabel("requests sent per second")
    ax.legend(loc="upper left")
    ax.set_title(f"{folder.name}: latency per {window_s:g}-s window, offered load in gray")
    fig.tight_layout()
    timeline = folder / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    _cdf(a, [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None], "TTFT")
    _cdf(b, [g * 1e3 for r in ok for g in r["itl_s"]], "ITL")
    for ax, name in ((a, "TTFT (ms)"), (b, "inter-token gap (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if ax is a else "fraction of gaps")
        ax.grid(alpha=0.3)
    fig.suptitle(folder.name)
    fig.tight_layout()
    cdf = folder / "cdf.png"
    fig.savefig(cdf, dpi=110)
    plt.close(fig)
    return [timeline, cdf]


def compare(folders: list[str | Path], output: str | Path) -> str:
    """A table of the runs' summaries, and `compare.png` with their CDFs, in `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for folder in map(Path, folders):
        s = json.loads((folder / "summary.json").read_text())
        rows.append((folder.name, s))
        ok = [r for r in load_records(folder) if r["status"] == "ok"]
        _cdf(a, [r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None], folder.name)
        _cdf(b, [g * 1e3 for r in ok for g in r["itl_s"]], folder.name)
    for ax, name in ((a, "TTFT (ms)"), (b, "inter-token gap (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output / "compare.png", dpi=110)
    plt.close(fig)

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"
    lines = ["| run | requests | ok | req/s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | goodput | SLO % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {s['requests']} | {s['ok']} | {s['achieved_rate']:.2f} | "
                     f"{s['output_tokens_per_s']:.1f} | {fmt(s['ttft_ms']['p50'])} | {fmt(s['ttft_ms']['p99'])} | "
                     f"{fmt(s['itl_ms']['p50'])} | {fmt(s['itl_ms']['p99'])} | {s['goodput_rps']:.2f} | "
                     f"{fmt(s['slo_attainment_pct'])} |")
    table = "\n".join(lines)
    (output / "compare.md").write_text(table + "\n")
    return table
