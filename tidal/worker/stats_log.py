"""The worker's periodic engine line: what its engine did since the last one, for whoever reads the log.

`EngineStatsLog` is handed each load snapshot the worker takes (`EngineStats`, every half second)
and, once `interval_s` has passed since its last look, logs one INFO line on `tidal.engine.stats`:

    engine: prefill 1843.2 tok/s, generation 402.5 tok/s, running 12, waiting 3, KV 41.3% (330/800 blocks),
    prefix hits 62.0%, preemptions 0

(and, on disaggregated workers, `pulling N, holding N, KV transfers N (X MB, Y ms)`). Throughputs and
rates are over the time since its last look; JSON logs carry the same numbers as fields.

It logs only when the engine ran a step since its last look or its queue, KV use or held KV changed
since the last line it logged, so an idle worker stays quiet: after a burst there is one last line
(with everything at zero), then nothing until work comes again. It keeps only its last snapshot.
"""

from __future__ import annotations

import logging

from tidal.logs import FIELDS
from tidal.protocol import EngineStats

logger = logging.getLogger("tidal.engine.stats")


def _state(stats: EngineStats) -> tuple[int, ...]:
    """What a line shows that can change without a step running (a queue, an end of a pull)."""
    return (stats.num_running, stats.num_waiting, stats.num_waiting_for_kv, stats.num_held_kv,
            stats.kv_blocks_used)


class EngineStatsLog:
    def __init__(self, interval_s: float, log: logging.Logger = logger) -> None:
        """`interval_s` > 0: the least time between two lines."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.log = log
        self._last: EngineStats | None = None
        self._last_time = 0.0
        self._logged_state: tuple[int, ...] | None = None

    def observe(self, stats: EngineStats, now: float) -> dict | None:
        """Look at a snapshot taken at `now` (time.monotonic()); the fields of the line it logged, if it
        logged one."""
        if self._last is None:  # the first look: the state a first line must differ from
            self._last, self._last_time, self._logged_state = stats, now, _state(stats)
            return None
        span_s = now - self._last_time
        if span_s < self.interval_s:
            return None
        last, self._last, self._last_time = self._last, stats, now
        state = _state(stats)
        if stats.steps_total == last.steps_total and state == self._logged_state:
            return None
        self._logged_state = state
        fields = engine_fields(last, stats, span_s)
        self.log.info(_text(fields), extra={FIELDS: fields})
        return fields


def engine_fields(last: EngineStats, now: EngineStats, span_s: float) -> dict:
    """The line's numbers: rates over `span_s` from the counters of two snapshots, and `now`'s gauges."""
    prompt = now.prompt_tokens - last.prompt_tokens
    total = now.kv_blocks_total
    return {
        "prefill_tokens_per_s": round((now.prefill_tokens_total - last.prefill_tokens_total) / span_s, 1),
        "generation_tokens_per_s": round((now.generation_tokens - last.generation_tokens) / span_s, 1),
        "running": now.num_running, "waiting": now.num_waiting,
        "kv_usage": round(now.kv_blocks_used / total, 4) if total else 0.0,
        "kv_blocks_used": now.kv_blocks_used, "kv_blocks_total": total,
        # Hits are counted when a prompt is scheduled, prompts when they arrive: a rate over a short span
        # may pass 1 (prompts that arrived before it), so it is capped.
        "prefix_hit_rate": min(1.0, round((now.prefix_cache_hit_tokens - last.prefix_cache_hit_tokens) / prompt, 4))
        if prompt > 0 else 0.0,
        "preemptions": now.preemptions_total - last.preemptions_total,
        "waiting_for_kv": now.num_waiting_for_kv, "held_kv": now.num_held_kv,
        "kv_transfers": now.kv_transfers - last.kv_transfers,
        "kv_transfer_bytes": now.kv_transfer_bytes - last.kv_transfer_bytes,
        "kv_transfer_seconds": round(now.kv_transfer_seconds - last.kv_transfer_seconds, 4),
    }


def _text(f: dict) -> str:
    line = (f"engine: prefill {f['prefill_tokens_per_s']:.1f} tok/s, generation {f['generation_tokens_per_s']:.1f} "
            f"tok/s, running {f['running']}, waiting {f['waiting']}, KV {100 * f['kv_usage']:.1f}% "
            f"({f['kv_blocks_used']}/{f['kv_blocks_total']} blocks), prefix hits {100 * f['prefix_hit_rate']:.1f}%, "
            f"preemptions {f['preemptions']}")
    if f["waiting_for_kv"] or f["held_kv"] or f["kv_transfers"]:
        line += (f", pulling {f['waiting_for_kv']}, holding {f['held_kv']}, KV transfers {f['kv_transfers']} "
                 f"({f['kv_transfer_bytes'] / 1e6:.1f} MB, {1e3 * f['kv_transfer_seconds']:.0f} ms)")
    return line
