"""The fleet experiment's plot (PNG, matplotlib): one figure per experiment, four panels sharing time.

1. offered load (requests arriving per second, per 10-s window);
2. TTFT p90 of the requests arriving in each window, one line per arm, the SLO dashed;
3. ITL p90 (every inter-token gap of the window), one line per arm, the SLO dashed;
4. pool sizes: the planner's active prefill and decode workers and all it holds (starting and
   draining included); each static arm's total as a flat line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_experiment(result: dict, path: str | Path, title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arms = result["arms"]
    series0 = arms[0]["series"]
    window_s = series0["window_s"]
    xs = [(i + 0.5) * window_s for i in range(len(series0["rate"]))]
    fig, (load, ttft, itl, pools) = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    load.bar(xs, series0["rate"], width=window_s * 0.9, color="gray", alpha=0.5)
    load.set_ylabel("arrivals (req/s)")
    for arm in arms:
        s = arm["series"]
        ttft.plot(xs, _nan(s["ttft_ms_p90"]), label=arm["arm"])
        itl.plot(xs, _nan(s["itl_ms_p90"]), label=arm["arm"])
    config = result["config"]
    for ax, key, name in ((ttft, "ttft_ms", "TTFT p90 (ms)"), (itl, "itl_ms", "ITL p90 (ms)")):
        ax.axhline(config[key], color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    for arm in arms:
        s = arm["series"]
        if arm["arm"] == "planner":
            pools.plot(xs, s["prefill"], label="planner: prefill (active)", color="tab:blue")
            pools.plot(xs, s["decode"], label="planner: decode (active)", color="tab:orange")
            pools.plot(xs, s["alive"], label="planner: all held", color="black", linewidth=1)
        else:
            pools.plot(xs, s["alive"], linestyle=":", label=f"{arm['arm']} (all)")
    pools.set_ylabel("workers")
    pools.set_xlabel("simulated time (s)")
    pools.legend(fontsize=8, loc="upper left")
    pools.grid(alpha=0.3)
    fig.suptitle(title or result.get("workload", ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]
