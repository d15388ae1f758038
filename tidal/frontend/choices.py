"""Several choices of one request (`n`, `best_of`): one engine request each, sharing the prompt's KV.

`Choices` owns the `GenerationRun`s of one HTTP request's choices. Choice 0 is the request as built;
choice i > 0 is a copy with its own request id (`ID-i`), its own seed (`seed + i`, so the choices
differ yet reproduce) and the same routing session. Choice 0 goes to the engine first (it is the one
the endpoint admits, so a refusal is a plain 503 before any response starts); the others are sent
only once its first step has come, when its prompt has been computed and the prompt's full blocks sit
in its worker's prefix cache. The session hint (the client's own session, else one made for the
request) makes the router send them to that same worker, where they find those blocks: the prompt is
computed once, and the KV of its full blocks is shared, not copied.

Lifecycle: `start()` (streams) waits for choice 0's first step; `steps()` is iterated once; it merges the choices' steps as (index, step) in the order they
come and ends when every choice has finished. Closing it early (client gone), or an error in any
choice, cancels every choice's run, which aborts its engine request. With one choice it is that
run's steps, with no task or queue between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio
import msgspec

from tidal.frontend.openai_types import INT64_MAX, PromptTokensDetails, UsageInfo
from tidal.frontend.serving import GenerationRun, ServingContext, TextStep, admit
from tidal.protocol import AddRequest, RoutingHints, TokenLogprob

QUEUE_STEPS = 4
"""Steps each choice may have waiting to be sent before its run waits for the reader."""


def choice_requests(request: AddRequest, num_choices: int) -> list[AddRequest]:
    """The engine requests of `num_choices` choices: `request` itself for one; else copies with ids
    `ID-i`, seeds `seed + i` (wrapped into int64) and one routing session (the client's, else `ID`)."""
    if num_choices == 1:
        return [request]
    hints = request.routing or RoutingHints()
    if not hints.session_id:
        hints = msgspec.structs.replace(hints, session_id=request.request_id)
    params = request.sampling_params
    out = []
    for i in range(num_choices):
        seed = params.seed if params.seed is None else _wrap_int64(params.seed + i)
        out.append(msgspec.structs.replace(
            request, request_id=f"{request.request_id}-{i}", routing=hints,
            sampling_params=msgspec.structs.replace(params, seed=seed)))
    return out


def _wrap_int64(value: int) -> int:
    return value - 2**64 if value > INT64_MAX else value


@dataclass
class ChoiceOutput:
    """One choice's whole output (a non-streamed response)."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, step: TextStep) -> None:
        self.texts.append(step.text)
        if step.logprobs:
            self.logprobs.extend(step.logprobs)
        self.finish_reason = step.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


class Choices:
    """The runs of one request's choices (see the module docstring)."""

    def __init__(self, ctx: ServingContext, request: AddRequest, num_choices: int, *,
                 skip_special_tokens: bool = True) -> None:
        self.request_id = request.request_id  # the id the client sees (the choices' own carry a suffix)
        self.runs = [GenerationRun(ctx, r, skip_special_tokens=skip_special_tokens)
                     for r in choice_requests(request, num_choices)]

    @classmethod
    async def admit(cls, ctx: ServingContext, request: AddRequest, num_choices: int, *,
                    skip_special_tokens: bool = True) -> Choices:
        """The choices of `request`, choice 0 admitted (a 503 now if refused); the others are admitted
        as they are sent."""
        choices = cls(ctx, request, num_choices, skip_special_tokens=skip_special_tokens)
        await admit(ctx, choices.runs[0].request)
        return choices

    async def start(self) -> None:
        """Waits for choice 0's first step (`GenerationRun.start`): a stream refused before any output
        gets the refusal as its response's status."""
        await self.runs[0].start()

    async def aclose(self) -> None:
        """Aborts every choice's engine request that has not finished."""
        for run in self.runs:
            await run.aclose()

    def usage(self) -> UsageInfo:
        """The prompt once (its cache hits as choice 0 found them), the completion tokens of every choice."""
        first = self.runs[0]
        completion = sum(run.num_generated_tokens for run in self.runs)
        return UsageInfo(prompt_tokens=first.num_prompt_tokens, completion_tokens=completion,
                         total_tokens=first.num_prompt_tokens + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=first.num_cached_tokens))

    async def steps(self) -> AsyncIterator[tuple[int, TextStep]]:
        if len(self.runs) == 1:
            async with aclosing(self.runs[0].steps()) as steps:
                async for step in steps:
                    yield 0, step
            return
        # Each choice may have QUEUE_STEPS steps waiting (a credit each, given back as they are read), so
        # a choice whose steps come fast can't crowd the others out of a FIFO that stays bounded.
        queue: asyncio.Queue[tuple[int, TextStep | Exception | None]] = asyncio.Queue()
        credits = [asyncio.Semaphore(QUEUE_STEPS) for _ in self.runs]
        prompt_computed = asyncio.Event()
        handled = [asyncio.Event() for _ in self.runs]  # the reader is done with the choice's last step
        tasks = [asyncio.create_task(self._pump(i, queue, credits[i], prompt_computed, handled[i]))
                 for i in range(len(self.runs))]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    credits[index].release()
                    yield index, item
                    if item.finish_reason is not None:
                        handled[index].set()
        finally:
            for task in tasks:
                task.cancel()  # a run cancelled mid-stream aborts its engine request
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, index: int, queue: asyncio.Queue, credit: asyncio.Semaphore,
                    prompt_computed: asyncio.Event, handled: asyncio.Event) -> None:
        """Choice `index`'s steps into `queue` (one credit each), then None; an error in its place.
        Choice 0 sets `prompt_computed` at its first step (or its end); the others wait for it first.
        After the choice's last step it waits until the reader has `handled` it before letting its run
        end, so a finish reason the reader sets on the run (tool_calls) is the one the run records, as
        with one choice."""
        try:
            if index:
                await prompt_computed.wait()
            async with aclosing(self.runs[index].steps()) as steps:
                async for step in steps:
                    prompt_computed.set()
                    await credit.acquire()
                    queue.put_nowait((index, step))
                    if step.finish_reason is not None:
                        await handled.wait()
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - raised again where the steps are read
            queue.put_nowait((index, exc))
        finally:
            prompt_computed.set()

    async def collect(self) -> list[ChoiceOutput]:
        """Every choice's whole output, by index (a non-streamed response)."""
        outputs = [ChoiceOutput(i) for i in range(len(self.runs))]
        async with aclosing(self.steps()) as steps:
            async for index, step in steps:
                outputs[index].add(step)
        return outputs


def most_likely(outputs: list[ChoiceOutput], n: int) -> list[ChoiceOutput]:
    """`best_of`: the `n` outputs of highest cumulative logprob, most likely first, indexed 0..n-1."""
    best = sorted(outputs, key=lambda out: out.cumulative_logprob, reverse=True)[:n]
    for index, out in enumerate(best):
        out.index = index
    return best
