"""How a simulated worker spends its time: prefill steps on a prefill worker, a fluid continuous
batch on a decode worker. `WorkerSteps` changes `SimWorker` state and schedules the worker's events;
it tells its `StepListener` (the fleet) of every first token and every finish.

Approximations (the price of speed; tests/test_planner_sim.py checks the exact cases):
- Prefill: FIFO; a step batches whole waiting prompts up to `token_budget` tokens. A prompt longer
  than the budget runs alone, as `tokens / budget` steps of `token_budget` tokens each (chunked
  prefill at the knee), in one event.
- Decode is a fluid: between two events of a worker (a join, a finish, or a refresh every
  `refresh_s`) its batch is fixed, so every sequence gains one token per step of
  `step_s(0, batch, context)`, the context taken at the start of that span. A worker's "token clock"
  advances by elapsed / step_s (fractional); a request finishes when the clock passes its target.
  So events are per request, not per step.
- A local prefill stalls its decode worker's whole batch for the extra time that prefill adds to one
  step (`step_s(uncached, batch, ctx) - step_s(0, batch, ctx)`).
- KV: a decode worker reserves `input_len + output_len` tokens of its capacity on admission (no
  preemption); a request that doesn't fit, or finds the batch full, waits in that worker's queue.

ITL samples: `gaps` gets (time_s, gap_ms, tokens) for every decode span: the step time weighted by
the tokens it produced (a local prefill's stall is one long gap for the batch it stalled).
"""

from __future__ import annotations

import heapq
from typing import Protocol

from tidal.sim.fleet_config import FleetConfig
from tidal.sim.fleet_events import EventQueue
from tidal.sim.fleet_worker import SimRequest, SimWorker
from tidal.sim.timing import StepTimeModel


class StepListener(Protocol):
    def first_token(self, request: SimRequest) -> None: ...

    def finished(self, request: SimRequest) -> None: ...


class WorkerSteps:
    def __init__(self, config: FleetConfig, model: StepTimeModel, events: EventQueue, listener: StepListener):
        self.config = config
        self.model = model
        self.events = events
        self.listener = listener
        self.gaps: list[tuple[float, float, float]] = []

    # ---- prefill workers ------------------------------------------------------------------------
    def send_prefill(self, worker: SimWorker, request: SimRequest) -> None:
        worker.queue.append(request)
        worker.pending_tokens += request.uncached_tokens
        if not worker.prefill_busy:
            self.start_prefill_step(worker)

    def start_prefill_step(self, worker: SimWorker) -> None:
        budget = self.config.token_budget
        head = worker.queue[0]
        if head.uncached_tokens >= budget:
            batch = [worker.queue.popleft()]
            tokens = head.uncached_tokens
            steps = tokens / budget
            step_s = steps * self.model.step_s(budget, 0, 0)
        else:
            batch, tokens = [], 0
            while worker.queue and tokens + worker.queue[0].uncached_tokens <= budget:
                request = worker.queue.popleft()
                batch.append(request)
                tokens += request.uncached_tokens
            steps = 1.0
            step_s = self.model.step_s(tokens, 0, 0)
        worker.prefill_busy = True
        worker.stats.steps += steps
        worker.stats.busy_s += step_s
        worker.stats.prefill_tokens += tokens
        self.events.after(step_s, "prefill_done", (worker, batch, tokens))

    def finish_prefill_step(self, worker: SimWorker, batch: list[SimRequest], tokens: int) -> None:
        """The step's prompts have their first token; their KV starts for their decode worker."""
        worker.prefill_busy = False
        worker.pending_tokens -= tokens
        config, now = self.config, self.events.now
        for request in batch:
            request.first_token_s = now
            self.listener.first_token(request)
            if request.output_len <= 1:
                request.finish_s = now
                self.listener.finished(request)
                continue
            transfer_s = config.transfer_latency_s + request.input_len * config.kv_bytes_per_token / config.transfer_bytes_per_s
            self.events.after(transfer_s, "kv_ready", request)

    # ---- decode workers -------------------------------------------------------------------------
    def send_decode(self, worker: SimWorker, request: SimRequest) -> None:
        """Into the worker's waiting queue (its KV arrived, or it prefills here), then into its batch
        if there is room."""
        self.advance(worker)
        if request.local_prefill:
            worker.pending_tokens += request.uncached_tokens
        worker.waiting.append(request)
        self._admit(worker)
        self._reschedule(worker)

    def advance(self, worker: SimWorker) -> None:
        """Move the worker's token clock to now at the current span's step time."""
        now, start = self.events.now, worker.t_last
        if now <= start:
            return
        worker.t_last = now
        if not worker.batch or worker.step_s <= 0:
            return
        elapsed = now - start
        steps = elapsed / worker.step_s
        batch = len(worker.batch)
        worker.clock += steps
        stats = worker.stats
        stats.steps += steps
        stats.busy_s += elapsed
        stats.decode_tokens += steps * batch
        stats.batch_steps += steps * batch
        stats.context_steps += steps * worker.context_sum()
        self.gaps.append((now, worker.step_s * 1000, steps * batch))

    def on_decode(self, worker: SimWorker, version: int) -> None:
        """A decode event: the requests whose token clock has passed finish, waiting ones join."""
        if version != worker.version or worker.state == "stopping":
            return
        self.advance(worker)
        while worker.batch and worker.batch[0][0] <= worker.clock + 1e-9:
            _, _, request = heapq.heappop(worker.batch)
            request.finish_s = self.events.now
            worker.kv_used -= request.kv_tokens
            worker.ctx_base -= request.input_len + 1 - request.join_clock
            self.listener.finished(request)
        self._admit(worker)
        self._reschedule(worker)

    def _admit(self, worker: SimWorker) -> None:
        """Move waiting requests into the batch while there is room (batch size and KV)."""
        config = self.config
        while worker.waiting and len(worker.batch) < config.max_decode_batch:
            request = worker.waiting[0]
            if worker.batch and worker.kv_used + request.kv_tokens > config.kv_capacity_tokens:
                break
            worker.waiting.popleft()
            worker.kv_used += request.kv_tokens
            if request.local_prefill:
                self._local_prefill(worker, request)
            else:
                self._join(worker, request, request.input_len + 1, request.output_len - 1)

    def _join(self, worker: SimWorker, request: SimRequest, context: int, remaining_tokens: int) -> None:
        start_clock = worker.clock
        request.join_clock = start_clock
        worker.ctx_base += context - start_clock
        heapq.heappush(worker.batch, (start_clock + remaining_tokens, request.request_id, request))

    def _local_prefill(self, worker: SimWorker, request: SimRequest) -> None:
        """The prompt prefills inside one of the worker's steps: the batch stalls for the extra time."""
        batch = len(worker.batch)
        context = worker.context_sum()
        extra_s = self.model.step_s(request.uncached_tokens, batch, int(context))
        if batch:
            extra_s -= self.model.step_s(0, batch, int(context))
            self.gaps.append((self.events.now, (extra_s + worker.step_s) * 1000, batch))
        resume = max(worker.t_last, self.events.now) + extra_s
        worker.t_last = resume
        worker.stats.busy_s += extra_s
        worker.stats.prefill_tokens += request.uncached_tokens
        request.first_token_s = resume
        self.events.at(resume, "local_first_token", (worker, request))
        self._join(worker, request, request.input_len + 1, request.output_len - 1)

    def local_first_token(self, worker: SimWorker, request: SimRequest) -> None:
        """A local prefill's stall has ended: the prompt is no longer pending, its first token is out."""
        worker.pending_tokens -= request.uncached_tokens
        self.listener.first_token(request)

    def _reschedule(self, worker: SimWorker) -> None:
        worker.version += 1
        if not worker.batch:
            worker.step_s = 0.0
            return
        batch = len(worker.batch)
        worker.step_s = self.model.step_s(0, batch, int(worker.context_sum()))
        start = max(worker.t_last, self.events.now)
        to_finish_s = max(worker.batch[0][0] - worker.clock, 0.0) * worker.step_s
        self.events.at(start + min(to_finish_s, self.config.refresh_s), "decode", worker, worker.version)
