"""Request traces for replay: Mooncake JSONL and Azure LLM-trace CSV, as `TraceRequest`s.

- Mooncake (FAST'25): one JSON object a line, `timestamp` (ms), `input_length`, `output_length`,
  `hash_ids` (one id per `block_tokens` = 512-token block of the prompt; equal ids mean equal
  prefixes). `synthesize_prompt` turns the ids into token ids so that equal ids give equal token
  blocks: block i is drawn from a generator seeded with its id, and the prompt is cut to its length.
- Azure LLM inference trace (Splitwise, ISCA'24): CSV `TIMESTAMP,ContextTokens,GeneratedTokens`,
  timestamps as date-times; prompts are random (this trace has no prefix information).

Times are seconds from the first request, multiplied by `time_scale` (2.0 replays at half speed);
lengths can be capped for small models (`max_input_len`, `max_output_len`).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRequest:
    time_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = field(default=())


def load_trace(path: str | Path, fmt: str = "auto", time_scale: float = 1.0, max_requests: int | None = None,
               max_input_len: int | None = None, max_output_len: int | None = None) -> list[TraceRequest]:
    path = Path(path)
    if fmt == "auto":
        fmt = "mooncake" if path.suffix == ".jsonl" else "azure" if path.suffix == ".csv" else ""
    if fmt == "mooncake":
        rows = _mooncake(path, max_requests)
    elif fmt == "azure":
        rows = _azure(path, max_requests)
    else:
        raise ValueError(f"unknown trace format for {path}: use mooncake (.jsonl) or azure (.csv)")
    if not rows:
        return []
    start = rows[0].time_s
    out = []
    for r in rows:
        input_len = min(r.input_len, max_input_len) if max_input_len else r.input_len
        output_len = min(r.output_len, max_output_len) if max_output_len else r.output_len
        out.append(TraceRequest((r.time_s - start) * time_scale, max(input_len, 1), max(output_len, 1), r.hash_ids))
    return out


def _mooncake(path: Path, max_requests: int | None) -> list[TraceRequest]:
    rows = []
    with open(path) as f:
        for line in f:
            if max_requests is not None and len(rows) >= max_requests:
                break
            if not line.strip():
                continue
            d = json.loads(line)
            rows.append(TraceRequest(d["timestamp"] / 1000.0, int(d["input_length"]), int(d["output_length"]),
                                     tuple(d.get("hash_ids", ()))))
    return rows


def _azure(path: Path, max_requests: int | None) -> list[TraceRequest]:
    rows = []
    with open(path, newline="") as f:
        for d in csv.DictReader(f):
            if max_requests is not None and len(rows) >= max_requests:
                break
            stamp = d["TIMESTAMP"].strip()
            if "." in stamp:  # the trace has 7 fractional digits; datetime takes 6
                head, frac = stamp.split(".", 1)
                stamp = f"{head}.{frac[:6]}"
            t = datetime.fromisoformat(stamp).timestamp()
            rows.append(TraceRequest(t, int(d["ContextTokens"]), int(d["GeneratedTokens"])))
    return rows


def synthesize_prompt(request: TraceRequest, vocab_size: int, rng: random.Random,
                      block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> list[int]:
    """Token ids for a trace request: equal hash ids give equal blocks, the rest is random."""
    tokens: list[int] = []
    for block_id in request.hash_ids:
        if len(tokens) >= request.input_len:
            break
        block_rng = random.Random(block_id * 2_654_435_761 + 97)
        tokens.extend(block_rng.randrange(vocab_size) for _ in range(block_tokens))
    while len(tokens) < request.input_len:
        tokens.append(rng.randrange(vocab_size))
    return tokens[:request.input_len]
