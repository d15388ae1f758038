"""What one headline point measured, from its bench records (`tidal.bench.metrics.RequestRecord`).

Counted: requests scheduled inside the measured window [warmup_s, warmup_s + measure_s). A request
the harness cut (still streaming `grace_s` after the window) or that failed or was rejected is a
miss under every SLO. Under each regime (P90 targets):
- `attainment_pct`: share of counted requests that finished with TTFT <= target and the P90 of
  their own inter-token gaps <= target; `goodput_rps` = those per second of window, and per GPU;
- `strict_*`: the same with the request's worst gap instead of its P90 (`RequestRecord.good`);
- `p90_met`: whether the point as a whole meets the regime: TTFT P90 over requests and ITL P90 over
  every gap within the targets, and no failed request.
Also: latency distributions (`tidal.bench.metrics.summarize`), each request's worst stall, and
per `window_s` window of the whole run (warm-up included, times from the run's start) the arrivals,
TTFT p90 and the p99 of the gaps that ended in it.
"""

from __future__ import annotations

from tidal.bench.metrics import RequestRecord, percentile, summarize

SLO_REGIMES = {
    "tight": {"ttft_ms": 300.0, "itl_ms": 100.0},
    "balanced": {"ttft_ms": 1000.0, "itl_ms": 50.0},
    "relaxed": {"ttft_ms": 3000.0, "itl_ms": 25.0},
}


def finished(r: RequestRecord) -> bool:
    """Ended with its whole stream (a cut request keeps status ok but has no end time)."""
    return r.status == "ok" and r.e2e_s is not None


def good_p90(r: RequestRecord, slo: dict[str, float]) -> bool:
    if not finished(r) or r.ttft_s is None or r.ttft_s * 1e3 > slo["ttft_ms"]:
        return False
    p90 = percentile(r.itl_s, 90)
    return p90 is None or p90 * 1e3 <= slo["itl_ms"]


def regime_metrics(counted: list[RequestRecord], slo: dict[str, float], measure_s: float, gpus: int) -> dict:
    n = max(len(counted), 1)
    good = sum(good_p90(r, slo) for r in counted)
    strict = sum(finished(r) and r.good(slo) for r in counted)
    done = [r for r in counted if finished(r)]
    ttft_p90 = percentile([r.ttft_s for r in done if r.ttft_s is not None], 90)
    itl_p90 = percentile([g for r in done for g in r.itl_s], 90)
    p90_met = (len(done) == len(counted) and ttft_p90 is not None and ttft_p90 * 1e3 <= slo["ttft_ms"]
               and (itl_p90 is None or itl_p90 * 1e3 <= slo["itl_ms"]))
    return {"attainment_pct": 100 * good / n, "goodput_rps": good / measure_s,
            "goodput_per_gpu": good / measure_s / gpus, "strict_attainment_pct": 100 * strict / n,
            "strict_goodput_per_gpu": strict / measure_s / gpus, "p90_met": p90_met}


def windows(records: list[RequestRecord], window_s: float) -> list[dict]:
    """Per window from the run's start: arrivals/s, TTFT p90 of requests sent in it, ITL p99 of gaps ending in it."""
    end = max((r.sent_s + (r.e2e_s or 0.0) for r in records), default=0.0)
    count = int(end // window_s) + 1
    sent: list[list[float]] = [[] for _ in range(count)]
    gaps: list[list[float]] = [[] for _ in range(count)]
    arrivals = [0] * count
    for r in records:
        i = min(int(r.scheduled_s // window_s), count - 1)
        arrivals[i] += 1
        if r.ttft_s is None:
            continue
        sent[min(int(r.sent_s // window_s), count - 1)].append(r.ttft_s)
        t = r.sent_s + r.ttft_s
        for gap in r.itl_s:
            t += gap
            gaps[min(int(t // window_s), count - 1)].append(gap)
    return [{"t": i * window_s, "arrivals_per_s": arrivals[i] / window_s,
             "ttft_ms_p90": _ms(percentile(sent[i], 90)), "itl_ms_p99": _ms(percentile(gaps[i], 99))}
            for i in range(count)]


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else value_s * 1e3


def point_metrics(records: list[RequestRecord], warmup_s: float, measure_s: float, gpus: int,
                  window_s: float = 5.0) -> dict:
    counted = [r for r in records if warmup_s <= r.scheduled_s < warmup_s + measure_s]
    done = [r for r in counted if finished(r)]
    summary = summarize(done, measure_s, {})
    stalls = [r.max_itl_s for r in done if r.max_itl_s is not None]
    return {
        "requests": len(counted),
        "finished": len(done),
        "unfinished": sum(r.status == "ok" and r.e2e_s is None for r in counted),
        "errors": sum(r.status == "error" for r in counted),
        "rejected": sum(r.status == "rejected" for r in counted),
        "achieved_rps": len(counted) / measure_s,
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "input_tokens_mean": sum(r.input_tokens for r in done) / len(done) if done else None,
        "output_tokens_mean": sum(r.output_tokens for r in done) / len(done) if done else None,
        "ttft_ms": summary["ttft_ms"], "itl_ms": summary["itl_ms"], "tpot_ms": summary["tpot_ms"],
        "e2e_ms": summary["e2e_ms"],
        "worst_stall_ms": {**summary["max_itl_ms"], "max": max(stalls) * 1e3 if stalls else None},
        "schedule_lag_p99_ms": summarize(counted, measure_s, {})["schedule_lag_p99_ms"] if counted else 0.0,
        "regimes": {name: regime_metrics(counted, slo, measure_s, gpus) for name, slo in SLO_REGIMES.items()},
        "window_s": window_s,
        "windows": windows(records, window_s),
        "error_samples": sorted({r.error for r in counted if r.error})[:5],
    }
