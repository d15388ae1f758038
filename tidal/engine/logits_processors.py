"""Penalties and logit bias: what a request's own history and its `logit_bias` do to its logits.

Applied to the logits of the rows that sample, before the sampler picks (and before its logprobs,
so they describe the distribution the token was drawn from). The semantics are OpenAI's and vLLM's,
in vLLM's order:
1. `logit_bias`: each (token id, bias) pair adds the bias to that token's logit;
2. `repetition_penalty` (vLLM's; 1 is off): every token seen in the prompt or the output so far has a
   positive logit divided by it, a negative one multiplied by it;
3. `frequency_penalty`: subtracted once per occurrence of the token in the output so far;
4. `presence_penalty`: subtracted once from every token present in the output so far.

Only rows that use one of them pay anything: the common case (no row does) costs one pass over the
rows' `logits_adjustment` (computed once per request; None when unused), no tensor work. The rows
that do are adjusted together and sparsely: only the (row, token) entries a bias names or a penalty
reaches (the tokens each row has seen) are gathered, changed and scattered back, with one
host-to-device copy of their token ids, so a step costs what those rows' token lists cost, not
rows x vocabulary. Stateless: the counts are rebuilt each step from the requests' token lists, so
preemption, recompute and migration need no bookkeeping here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tidal.config import MAX_ABS_LOGIT_BIAS, MAX_ABS_PENALTY, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY
from tidal.protocol import SamplingParams


@dataclass(frozen=True, slots=True)
class LogitsAdjustment:
    """What one request asks of its logits; `None` from `of` when it asks nothing (the common case)."""

    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, params: SamplingParams) -> LogitsAdjustment | None:
        if (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
                and params.repetition_penalty == 1.0 and not params.logit_bias):
            return None
        return cls(params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
                   params.logit_bias)

    @property
    def counts_output(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class AdjustedRow(Protocol):
    """What `adjust_logits` reads of a request: an engine `Request` has all of it. Its output so far is
    `all_token_ids[num_prompt_tokens - num_resumed_tokens:]` (a migrated request's prompt ends with
    the output it sampled elsewhere)."""

    logits_adjustment: LogitsAdjustment | None
    all_token_ids: list[int]
    num_prompt_tokens: int
    num_resumed_tokens: int


def check_params(params: SamplingParams, vocab_size: int) -> str | None:
    """Why the engine refuses these values (None: it takes them); the frontend checks the same first."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
            return f"{name} must lie in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}]"
    if not MIN_REPETITION_PENALTY <= params.repetition_penalty <= MAX_REPETITION_PENALTY:
        return f"repetition_penalty must lie in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]"
    for token_id, bias in params.logit_bias:
        if not 0 <= token_id < vocab_size:
            return f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})"
        if not -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS:
            return f"logit_bias values must lie in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]"
    return None


def adjust_logits(logits: torch.Tensor, requests: Sequence[AdjustedRow]) -> torch.Tensor:
    """logits [N, vocab] (row i: requests[i]) with every row's penalties and bias applied, in place.

    Sparse: only the (row, token) entries a bias names or a penalty reaches (tokens the row has seen)
    are read and written, so a step costs what those rows' token lists cost, not rows x vocab."""
    rows = [i for i, r in enumerate(requests) if r.logits_adjustment is not None]
    if not rows:
        return logits
    vocab = logits.shape[1]  # ids at or past it are not sampled (a dummy model's narrowed logits): skipped
    _add_bias(logits, rows, [requests[i].logits_adjustment for i in rows], vocab)
    penalized = [i for i in rows if requests[i].logits_adjustment.counts_output]
    if penalized:
        _apply_penalties(logits, penalized, [requests[i] for i in penalized], vocab)
    return logits


def _add_bias(logits: torch.Tensor, rows: list[int], adjustments: list[LogitsAdjustment], vocab: int) -> None:
    entries = [(row, token_id, bias) for row, a in zip(rows, adjustments)
               for token_id, bias in a.logit_bias if token_id < vocab]
    if not entries:
        return
    row_ids, token_ids, biases = zip(*entries)
    device = logits.device
    logits.index_put_((_to_device(row_ids, torch.int64, device), _to_device(token_ids, torch.int64, device)),
                      _to_device(biases, logits.dtype, device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: list[int], requests: list[AdjustedRow], vocab: int) -> None:
    """Repetition, then frequency and presence, on the entries (row, token) of every token each row has
    seen: its output's (counted), and its prompt's when it penalizes repetition."""
    device = logits.device
    tokens, row_of, from_output = [], [], []  # flat over the rows' seen tokens
    for row, request in zip(rows, requests):
        cut = request.num_prompt_tokens - request.num_resumed_tokens
        parts = [(request.all_token_ids[cut:], 1.0)]
        if request.logits_adjustment.repetition_penalty != 1.0:
            parts.append((request.all_token_ids[:cut], 0.0))
        for ids, is_output in parts:
            tokens.append(torch.tensor(ids, dtype=torch.int64))
            row_of.append(torch.full((len(ids),), row, dtype=torch.int64))
            from_output.append(torch.full((len(ids),), is_output))
    flat_tokens, flat_rows, flat_output = torch.cat(tokens), torch.cat(row_of), torch.cat(from_output)
    if flat_tokens.numel() and int(flat_tokens.max()) >= vocab:
        inside = flat_tokens < vocab
        flat_tokens, flat_rows, flat_output = flat_tokens[inside], flat_rows[inside], flat_output[inside]
    keys = _to_host_device(flat_rows * vocab + flat_tokens, device)
    seen, inverse = torch.unique(keys, return_inverse=True)  # [E] distinct (row, token) entries
    counts = torch.zeros(seen.shape[0], device=device).index_add_(
        0, inverse, _to_host_device(flat_output, device))  # [E] occurrences in the output
    entry_rows, entry_tokens = seen // vocab, seen % vocab
    per_row = torch.zeros(logits.shape[0], 3)  # [N, 3]: repetition, frequency, presence
    per_row[rows] = torch.tensor([[r.logits_adjustment.repetition_penalty, r.logits_adjustment.frequency_penalty,
                                   r.logits_adjustment.presence_penalty] for r in requests])
    per_entry = _to_host_device(per_row, device)[entry_rows]  # [E, 3]
    values = logits[entry_rows, entry_tokens].float()
    repetition = per_entry[:, 0]  # 1 on rows that leave repetition alone: dividing by it changes nothing
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= per_entry[:, 1] * counts + per_entry[:, 2] * (counts > 0)
    logits[entry_rows, entry_tokens] = values.to(logits.dtype)


def _to_host_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting on the device queue (pinned, asynchronous copy)."""
    return _to_host_device(torch.tensor(values, dtype=dtype), device)
