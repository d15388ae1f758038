"""Token selection from logits: greedy, temperature, top-k, top-p, min-p, seeds, logprobs.

Vectorized over the batch: one sort of the logits serves top-k, top-p and min-p. Sampling uses
the exponential-race trick (argmax of p / E with E ~ Exp(1)), so a seeded request draws its
noise from its own generator and gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.protocol import SamplingParams, TokenLogprob


@dataclass
class SamplingBatch:
    """The sampling parameters of the rows of one logits matrix."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    # Token ids that must not be chosen yet, per row (eos and stop ids before min_tokens).
    banned_token_ids: list[list[int]] | None = None


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [N, vocab] float32 -> (token id per row, logprobs per row or None).

    Every decision about which work to do is made from the host-side parameters, and host lists
    reach the device through pinned memory, so the device queue is never waited on until the one
    copy of the results at the end.
    """
    logits = logits.float()
    device = logits.device
    if batch.banned_token_ids is not None:
        rows = [row for row, banned in enumerate(batch.banned_token_ids) for _ in banned]
        cols = [token for banned in batch.banned_token_ids for token in banned]
        if rows:
            logits = logits.clone()
            logits[_to_device(rows, torch.int64, device), _to_device(cols, torch.int64, device)] = float("-inf")
    num_logprobs = [p.logprobs for p in batch.params]
    want_logprobs = any(k is not None for k in num_logprobs)

    if all(p.greedy for p in batch.params):
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = _sample_random(logits, batch)
    if not want_logprobs:
        return token_ids.tolist(), [None] * len(batch.params)
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    k_max = max(k or 0 for k in num_logprobs)
    top_vals, top_ids = raw_logprobs.topk(max(k_max, 1), dim=-1)
    chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    # One trip to the host for everything (ids are exact in float64).
    host = torch.cat([token_ids[:, None].double(), chosen[:, None].double(), top_vals.double(),
                      top_ids.double()], dim=1).cpu()
    token_list = host[:, 0].long().tolist()
    chosen_list = host[:, 1].tolist()
    width = top_vals.shape[1]
    vals, ids = host[:, 2:2 + width].tolist(), host[:, 2 + width:].long().tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(token_list)
    for row, k in enumerate(num_logprobs):
        if k is not None:
            logprobs[row] = TokenLogprob(token_list[row], chosen_list[row], list(zip(ids[row][:k], vals[row][:k])))
    return token_list, logprobs


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting on the device queue (pinned, asynchronous copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    params = batch.params
    num_rows, vocab = logits.shape
    device = logits.device
    greedy = _to_device([p.greedy for p in params], torch.bool, device)
    temperature = _to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
    logits = logits / temperature[:, None]

    top_k_list = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k_list) or any(p.top_p < 1.0 for p in params) or any(p.min_p > 0 for p in params):
        top_k = _to_device(top_k_list, torch.int64, device)
        top_p = _to_device([p.top_p for p in params], torch.float32, device)
        min_p = _to_device([p.min_p for p in params], torch.float32, device)
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest head whose mass reaches top_p (the token crossing it stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before > top_p[:, None]
        drop |= sorted_probs < (min_p[:, None] * sorted_probs[:, :1])
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)

    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(batch.generators):
        if generator is not None:  # a seeded request draws from its own (host) generator
            seeded = torch.empty(vocab).exponential_(generator=generator)
            noise[row] = seeded.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else seeded
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
