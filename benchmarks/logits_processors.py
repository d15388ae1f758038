"""What penalties and logit_bias cost per step on the CPU (tidal/engine/logits_processors.py).

B rows of V-wide float32 logits (SmolLM2's vocabulary by default), each request with a P-token prompt
and an O-token output; the median over `--repeats` of `adjust_logits` (the rows' request list built as
`ModelRunner.execute` builds it) when no row, one row or every row uses penalties and a logit_bias.
The first line is the common case: the figure it must keep near zero.

    python -m benchmarks.logits_processors [--batch 64] [--vocab 49152] [--prompt 512] [--output 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tidal.engine.logits_processors import adjust_logits
from tidal.engine.request import Request
from tidal.engine.scheduler import ScheduledRequest
from tidal.protocol import SamplingParams

USED = SamplingParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2,
                      logit_bias=((11, -100.0), (12, 5.0)))


def scheduled(batch: int, used: int, prompt: int, output: int, vocab: int) -> list[ScheduledRequest]:
    rng = random.Random(0)
    rows = []
    for i in range(batch):
        request = Request(str(i), [rng.randrange(vocab) for _ in range(prompt)], USED if i < used else SamplingParams(),
                          max_model_len=1 << 20)
        for _ in range(output):
            request.append_output_token(rng.randrange(vocab))
        rows.append(ScheduledRequest(request, 1, []))
    return rows


def median_us(samplers: list[ScheduledRequest], logits: torch.Tensor, repeats: int) -> float:
    """Wall time to the results (on a GPU: the device's work finished too)."""
    times = []
    cuda = logits.device.type == "cuda"
    for _ in range(repeats):
        work = logits.clone() if samplers[0].request.logits_adjustment else logits
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        adjust_logits(work, [s.request for s in samplers])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="/tmp/tidal-bench/logits_processors.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits = torch.randn(args.batch, args.vocab, device=args.device)
    results = []
    print(f"| rows using them (of {args.batch}, {args.device}) | adjust_logits median (us) |\n|---|---|")
    for used in (0, 1, args.batch):
        samplers = scheduled(args.batch, used, args.prompt, args.output, args.vocab)
        us = median_us(samplers, logits, args.repeats if used < args.batch else max(10, args.repeats // 10))
        results.append({"batch": args.batch, "rows_used": used, "median_us": us})
        print(f"| {used} | {us:.1f} |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
