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
reaches (the tokens each row has seen) are gathered, changed and scattered back. The entries and
their counts are found on the host, where the token lists are, and reach the device in one pinned
copy (no device sync), so a step costs what those rows' token lists cost, not rows x vocabulary. Stateless: the counts are rebuilt each step from the requests' token lists, so
preemption, recompute and migration need no bookkeeping here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
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
    packed = _to_host_device(torch.tensor(entries, dtype=torch.float64), logits.device)  # [B, 3]: ids exact
    logits.index_put_((packed[:, 0].long(), packed[:, 1].long()), packed[:, 2].to(logits.dtype), accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: list[int], requests: list[AdjustedRow], vocab: int) -> None:
    """Repetition, then frequency and presence, on the entries (row, token) of every token each row has
    seen: its output's (counted), and its prompt's when it penalizes repetition.

    The entries and their counts are found on the host (where the token lists are), then go to the
    device in one copy, so the device queue is never waited on."""
    output_keys, prompt_keys = [], []  # row * vocab + token id
    params = np.zeros((len(logits), 3))  # per row: repetition, frequency, presence
    for row, request in zip(rows, requests):
        a = request.logits_adjustment
        params[row] = (a.repetition_penalty, a.frequency_penalty, a.presence_penalty)
        cut = request.num_prompt_tokens - request.num_resumed_tokens
        output_keys.append(_keys(request.all_token_ids[cut:], row, vocab))
        if a.repetition_penalty != 1.0:
            prompt_keys.append(_keys(request.all_token_ids[:cut], row, vocab))
    seen, counts = np.unique(np.concatenate(output_keys), return_counts=True)  # [E] entries, output occurrences
    if prompt_keys:
        in_output = seen
        seen = np.union1d(in_output, np.concatenate(prompt_keys))
        counts_by_entry = np.zeros(len(seen))
        counts_by_entry[np.searchsorted(seen, in_output)] = counts
        counts = counts_by_entry
    if not len(seen):
        return
    # [E, 5]: key (exact in float64), count, the row's repetition, frequency and presence penalties
    packed = np.concatenate([seen[:, None], np.asarray(counts, dtype=np.float64)[:, None], params[seen // vocab]],
                            axis=1)
    packed = _to_host_device(torch.from_numpy(packed), logits.device)
    keys, counts_t = packed[:, 0].long(), packed[:, 1].float()
    entry_rows, entry_tokens = keys // vocab, keys % vocab
    repetition, frequency, presence = packed[:, 2].float(), packed[:, 3].float(), packed[:, 4].float()
    values = logits[entry_rows, entry_tokens].float()
    # a row that leaves repetition alone has 1 here: dividing or multiplying by it changes nothing
    values = torch.where(values > 0, values / repetition, values * repetition)
    values -= frequency * counts_t + presence * (counts_t > 0)
    logits[entry_rows, entry_tokens] = values.to(logits.dtype)


def _keys(token_ids: list[int], row: int, vocab: int) -> np.ndarray:
    """row * vocab + token id for each token below `vocab` (a dummy model's logits are narrowed to its
    tokenizer's size: ids past it are never sampled)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and ids.max() >= vocab:
        ids = ids[ids < vocab]
    return ids + row * vocab


def _to_host_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting on the device queue (pinned, asynchronous copy)."""
    return _to_host_device(torch.tensor(values, dtype=dtype), device)
