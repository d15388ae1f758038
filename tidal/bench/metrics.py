"""What one benchmark request measured, and the summary of a run: latency percentiles, stalls,
throughput, goodput under SLOs.

A `RequestRecord` holds times relative to the request's own start (`sent_s`, from the run's
start): `ttft_s` (first token), `itl_s` (every gap between streamed chunks that carried tokens),
`e2e_s`; TPOT is (e2e - ttft) / (output tokens - 1). A request is *good* for the SLOs when it
finished without error and met every one (`ttft_ms`, `itl_ms` (its worst gap), `tpot_ms`,
`e2e_ms`); errors and rejections count as misses. Goodput = good requests per second of the run.

`point_metrics` judges one measured window of a longer run (the headline's points) under the three
`SLO_REGIMES` at once (P90 targets). Counted: requests scheduled inside [warmup_s, warmup_s +
measure_s). A request the harness cut (still streaming after the window's grace) or that failed or
was rejected is a miss under every regime. Per regime:
- `attainment_pct`: share of counted requests that finished with TTFT <= target and the P90 of
  their own inter-token gaps <= target; `goodput_rps` = those per second of window, and per GPU;
- `strict_*`: the same with the request's worst gap instead of its P90 (`RequestRecord.good`);
- `p90_met`: whether the window as a whole meets the regime: TTFT P90 over requests and ITL P90 over
  every gap within the targets, and no failed request.
Also: latency distributions, each request's worst stall, and per `window_s` window of the whole run
(warm-up included, times from the run's start) the arrivals, TTFT p90 and the p99 of the gaps that
ended in it.

`streamed_window` counts what reached the client between two times of a run (tokens/s, ITL, TTFT),
for a load measured over a window of its own (api_server_scaling).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SLO_KEYS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")
SLO_REGIMES = {
    "tight": {"ttft_ms": 300.0, "itl_ms": 100.0},
    "balanced": {"ttft_ms": 1000.0, "itl_ms": 50.0},
    "relaxed": {"ttft_ms": 3000.0, "itl_ms": 25.0},
}
"""The headline's SLO regimes (P90 targets); the planner of a `tidal` arm holds one of them."""


@dataclass
class RequestRecord:
    request_id: str
    sent_s: float  # from the start of the run
    scheduled_s: float  # when the schedule wanted it sent
    input_tokens: int
    status: str = "ok"  # ok | error | rejected
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    session: int | None = None
    turn: int | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.status != "ok" or self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def max_itl_s(self) -> float | None:
        return max(self.itl_s) if self.itl_s else None

    @property
    def worst_decile_itl_s(self) -> float | None:
        """Mean of the longest 10% of this request's gaps (at least one gap)."""
        if not self.itl_s:
            return None
        worst = sorted(self.itl_s, reverse=True)[:max(1, math.ceil(len(self.itl_s) / 10))]
        return sum(worst) / len(worst)

    def good(self, slo: dict[str, float]) -> bool:
        if self.status != "ok":
            return False
        values_ms = {"ttft_ms": self.ttft_s, "itl_ms": self.max_itl_s, "tpot_ms": self.tpot_s, "e2e_ms": self.e2e_s}
        for key, limit in slo.items():
            value = values_ms[key]
            if value is not None and value * 1e3 > limit:
                return False
        return True

    def to_json(self) -> dict:
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        return out


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft_ms=500,itl_ms=50` -> {"ttft_ms": 500.0, "itl_ms": 50.0}."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {part!r}: use {', '.join(k + '=N' for k in SLO_KEYS)}")
        slo[key] = float(value)
    return slo


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _dist_ms(values_s: list[float]) -> dict[str, float | None]:
    return {f"p{q}": (None if (v := percentile(values_s, q)) is None else v * 1e3) for q in (50, 90, 99)} | {
        "mean": sum(values_s) / len(values_s) * 1e3 if values_s else None}


def summarize(records: list[RequestRecord], duration_s: float, slo: dict[str, float],
              offered_rate: float | None = None) -> dict:
    ok = [r for r in records if r.status == "ok"]
    good = [r for r in records if r.good(slo)]
    duration_s = max(duration_s, 1e-9)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": sum(r.status == "error" for r in records),
        "rejected": sum(r.status == "rejected" for r in records),
        "duration_s": duration_s,
        "offered_rate": offered_rate,  # arrivals per second: requests, or sessions for chat
        "achieved_rate": len(records) / duration_s,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s,
        "ttft_ms": _dist_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": _dist_ms([gap for r in ok for gap in r.itl_s]),
        "tpot_ms": _dist_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "e2e_ms": _dist_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "max_itl_ms": _dist_ms([t for r in ok if (t := r.max_itl_s) is not None]),
        "worst_decile_itl_ms": _dist_ms([t for r in ok if (t := r.worst_decile_itl_s) is not None]),
        "slo": slo,
        "goodput_rps": len(good) / duration_s,
        "slo_attainment_pct": 100 * len(good) / len(records) if records else None,
        "send_rate": (len(records) - 1) / max(max(r.sent_s for r in records) - min(r.sent_s for r in records), 1e-9)
        if len(records) > 1 else None,
        "schedule_lag_p99_ms": (percentile([r.sent_s - r.scheduled_s for r in records], 99) or 0.0) * 1e3,
        "max_schedule_lag_ms": max((r.sent_s - r.scheduled_s for r in records), default=0.0) * 1e3,
    }


def format_summary(summary: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.1f}"
    lines = [f"requests {summary['requests']} (ok {summary['ok']}, errors {summary['errors']}, rejected "
             f"{summary['rejected']}) in {summary['duration_s']:.1f} s; achieved {summary['achieved_rate']:.2f} req/s"
             + (f" (offered {summary['offered_rate']:.2f} arrivals/s)" if summary["offered_rate"] else "")
             + f"; {summary['output_tokens_per_s']:.1f} output tok/s",
             f"{'metric':<22}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}"]
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "max_itl_ms", "worst_decile_itl_ms"):
        d = summary[key]
        lines.append(f"{key:<22}{fmt(d['p50']):>10}{fmt(d['p90']):>10}{fmt(d['p99']):>10}{fmt(d['mean']):>10}")
    if "client_cpu_cores" in summary:
        lines.append(f"client: {summary['client_processes']} process(es), {summary['client_cpu_cores']:.2f} cores "
                     f"(busiest {summary['client_cpu_cores_max']:.2f})"
                     + (f"; WARNING {summary['client_warning']}" if summary["client_warning"] else ""))
    if summary["slo"]:
        lines.append(f"goodput {summary['goodput_rps']:.2f} req/s; SLO attainment "
                     f"{fmt(summary['slo_attainment_pct'])}% for {summary['slo']}")
    return "\n".join(lines)


# ---- one measured window under the SLO regimes --------------------------------------------------------------
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
        arrivals[min(int(r.scheduled_s // window_s), count - 1)] += 1
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


def streamed_window(records: list[RequestRecord], t0: float, t1: float) -> dict:
    """Streamed tokens/s, ITL and TTFT of what reached the client between t0 and t1 (run clock)."""
    tokens, gaps, ttfts = 0.0, [], []
    for r in records:
        if r.ttft_s is None:
            continue
        chunks = 1 + len(r.itl_s)
        per_chunk = (r.output_tokens or chunks) / chunks
        at = r.sent_s + r.ttft_s
        if t0 <= at < t1:
            tokens += per_chunk
            ttfts.append(r.ttft_s)
        for gap in r.itl_s:
            at += gap
            if t0 <= at < t1:
                tokens += per_chunk
                gaps.append(gap)
    ms = lambda xs, q: None if not xs else 1e3 * percentile(xs, q)  # noqa: E731
    return {"streamed_tok_s": tokens / (t1 - t0), "itl_ms": {f"p{q}": ms(gaps, q) for q in (50, 90, 99)},
            "ttft_ms": {f"p{q}": ms(ttfts, q) for q in (50, 90, 99)},
            "errors": sum(r.status != "ok" for r in records)}
