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
    """logits: [N, vocab] float32 -> (token id per row, logprobs per row or None)."""
    logits = logits.float()
    if batch.banned_token_ids is not None:
        for row, banned in enumerate(batch.banned_token_ids):
            if banned:
                logits[row, banned] = float("-inf")
    num_logprobs = [p.logprobs for p in batch.params]
    want_logprobs = any(k is not None for k in num_logprobs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    if all(p.greedy for p in batch.params):
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = _sample_random(logits, batch)
    token_list = token_ids.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(token_list)
    if want_logprobs:
        k_max = max(k or 0 for k in num_logprobs)
        top_vals, top_ids = raw_logprobs.topk(max(k_max, 1), dim=-1)
        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for row, k in enumerate(num_logprobs):
            if k is not None:
                top = list(zip(top_ids[row][:k], top_vals[row][:k]))
                logprobs[row] = TokenLogprob(token_list[row], chosen[row], top)
    return token_list, logprobs


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    params = batch.params
    num_rows, vocab = logits.shape
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]

    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if (top_k < vocab).any() or (top_p < 1.0).any() or (min_p > 0).any():
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
    noise = torch.empty_like(probs)
    unseeded = [row for row, g in enumerate(batch.generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_()
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            noise[row] = torch.empty(vocab, device="cpu").exponential_(generator=generator).to(device)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
