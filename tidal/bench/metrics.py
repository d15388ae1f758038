"""What one benchmark request measured, and the summary of a run: latency percentiles, stalls,
throughput, goodput under SLOs.

A `RequestRecord` holds times relative to the request's own start (`sent_s`, from the run's
start): `ttft_s` (first token), `itl_s` (every gap between streamed chunks that carried tokens),
`e2e_s`; TPOT is (e2e - ttft) / (output tokens - 1). A request is *good* for the SLOs when it
finished without error and met every one (`ttft_ms`, `itl_ms` (its worst gap), `tpot_ms`,
`e2e_ms`); errors and rejections count as misses. Goodput = good requests per second of the run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SLO_KEYS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")


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
