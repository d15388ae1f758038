"""`StructuredOutputs`: the grammar matchers of an engine's requests, and the token masks they put
on the sampler.

Owns a `GrammarCompiler` over the model's tokenizer (compiled constraints, cached: one compile
serves every request with that schema; a request's matcher is a copy of the compiled one), and one
matcher per unfinished request that asked for a `StructuredOutput`. A matcher's life:
- `add` when the engine takes the request. It is advanced over every token the request already
  has from elsewhere (the resumed output of a migrated request, a remote prefill's first token), so
  the rest of the output obeys the same grammar wherever it runs.
- `fill` before each step that samples the request writes its row of the step's bitmask; the
  runner calls it after launching the forward, so on a GPU the host work overlaps the model.
- `accept` after sampling advances it by the sampled token and says whether the grammar is complete
  (the request then finishes with "stop": the grammar allows nothing more).
- `free` when the request finishes or is aborted (the engine frees on its one finished delta).
Invariant: `num_active` is the number of unfinished requests with a grammar.
`seconds_total` is the host time spent in the grammar library (compiles, masks, accepts).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import llguidance
import llguidance.numpy
import numpy as np
import torch

from tidal.grammar import GrammarCompiler
from tidal.protocol import StructuredOutput
from tidal.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class GrammarMask:
    """One step's token masks: bit t of `bitmask[i]` set means sampler row `rows[i]` may pick token t."""

    rows: list[int]
    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32, on the host (pinned next to a GPU)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, V] with every forbidden token of the masked rows at -inf (in place); ids at or
        past the tokenizer's vocabulary are forbidden too."""
        forbidden = self._forbidden(logits.shape[1], logits.device)
        if len(self.rows) == logits.shape[0]:
            return logits.masked_fill_(forbidden, float("-inf"))
        rows = torch.tensor(self.rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
        return logits

    def _forbidden(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[R, vocab] bool, True where the token is forbidden. Unpacked where the logits are: on
        the host by numpy (one call, no thread-pool barrier), on a GPU from the 32x smaller bitmask."""
        num_rows = len(self.rows)
        if device.type == "cpu":
            inverted = ~self.bitmask.numpy().view(np.uint8)  # [R, 4W]: byte k holds tokens 8k..8k+7
            forbidden = torch.from_numpy(np.unpackbits(inverted, axis=1, bitorder="little")).view(torch.bool)
        else:
            bits = self.bitmask.to(device, non_blocking=True).view(torch.uint8)
            shifts = torch.arange(8, device=device, dtype=torch.uint8)
            forbidden = ((bits[:, :, None] >> shifts) & 1).view(num_rows, -1) == 0  # [R, 32W]
        if forbidden.shape[1] < vocab:
            forbidden = torch.nn.functional.pad(forbidden, (0, vocab - forbidden.shape[1]), value=True)
        return forbidden[:, :vocab]


class StructuredOutputs:
    def __init__(self, tokenizer: Tokenizer, device: torch.device, cache_size: int = 256):
        """`device`: where the logits are (a GPU's masks go through pinned host memory)."""
        self.compiler = GrammarCompiler(tokenizer, cache_size)
        self.vocab_size = tokenizer.vocab_size
        self._pin = device.type == "cuda"
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor()
        self._bitmask = self._allocate(16)
        self.seconds_total = 0.0

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    # ---- a request's matcher --------------------------------------------------------------------
    def add(self, request_id: str, structured: StructuredOutput, history: list[int]) -> str | None:
        """A matcher for the request, advanced over `history` (output it already has); None, or
        why the request cannot have one (its grammar, or a history that does not obey it)."""
        started = time.perf_counter()
        try:
            compiled = self.compiler.compile(structured)
            if isinstance(compiled, str):
                return f"the structured output's grammar is invalid: {compiled}"
            matcher = compiled.deep_copy()
            if history and not matcher.consume_tokens(history):
                return f"the request's earlier output does not match its structured output: {matcher.get_error()}"
            self._matchers[request_id] = matcher
            return None
        finally:
            self.seconds_total += time.perf_counter() - started

    def free(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    # ---- one step -------------------------------------------------------------------------------
    def fill(self, request_ids: list[str]) -> GrammarMask | None:
        """The masks of the sampler rows (`request_ids`, in row order) that have a grammar; None if none has."""
        rows = [(row, m) for row, request_id in enumerate(request_ids)
                if (m := self._matchers.get(request_id)) is not None]
        if not rows:
            return None
        started = time.perf_counter()
        if len(rows) > self._bitmask.shape[0]:
            self._bitmask = self._allocate(2 * len(rows))
        # The buffer is reused: the last step's copy from it is done, since that step's sampling
        # waited for its results.
        bitmask = self._bitmask[:len(rows)]
        host = bitmask.numpy()
        if len(rows) == 1:
            llguidance.numpy.fill_next_token_bitmask(rows[0][1], host, 0)
        else:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(m, i) for i, (_, m) in enumerate(rows)],
                                                         host)
        self.seconds_total += time.perf_counter() - started
        return GrammarMask([row for row, _ in rows], bitmask)

    def accept(self, sampled: dict[str, int]) -> set[str]:
        """Advance each matcher by its request's sampled token; the requests whose grammar is now
        complete. A token the matcher refuses (a row whose every token was forbidden) ends the
        request too, rather than let it run on unconstrained."""
        started = time.perf_counter()
        complete = set()
        for request_id, token_id in sampled.items():
            matcher = self._matchers.get(request_id)
            if matcher is None:
                continue
            if not matcher.consume_token(token_id):
                logger.warning("request %s: token %d broke its grammar: %s", request_id, token_id,
                               matcher.get_error())
                complete.add(request_id)
            elif matcher.is_stopped():
                complete.add(request_id)
        self.seconds_total += time.perf_counter() - started
        return complete

    def _allocate(self, num_rows: int) -> torch.Tensor:
        return torch.empty((num_rows, (self.vocab_size + 31) // 32), dtype=torch.int32, pin_memory=self._pin)
