"""The load generator's run loop: workloads on an arrival clock, records out, a summary at the end.

Workloads:
- `synthetic`: single-turn `/v1/completions` requests whose prompts are random token ids of
  `input_len` (+- `input_len_range` x input_len, uniform), asking for `output_len` tokens with
  `ignore_eos`, so every server does the same work. Requests start on the arrival clock.
- `trace`: replay of a Mooncake JSONL or Azure CSV trace (`tidal.bench.traces`): each request at
  its (scaled) timestamp, as `/v1/completions` with synthesized token ids (equal Mooncake hash ids
  give equal prefixes) and the trace's output length (`ignore_eos`).
- `chat`: sessions of `turns` turns on `/v1/chat/completions`. Sessions start on the arrival clock;
  each has a system prompt shared by all sessions (`system_words` words), and every turn adds a user
  message of `user_words` words; the reply the server actually streamed joins the history, and the
  next turn is sent after an exponential think time (`think_s` mean).

The schedule is kept by one task per request (or session); the generator warns when it sends
later than scheduled (`max_schedule_lag_ms` in the summary says by how much), which means the
client, not the server, was the bottleneck. It also measures its own CPU (`client_cpu_cores`: this
process's CPU seconds over the run's wall seconds) and warns above `CLIENT_CPU_WARN_CORES`: one
Python process streaming many tokens a second can become the limit of what it measures.
`tidal.bench.clients` splits a run over several processes when one is not enough.

Results: `records.jsonl` (one line per request) and `summary.json` in the output folder, and the
summary table on stdout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tidal.bench.arrivals import ArrivalShape, make_arrivals
from tidal.bench.client import stream_request
from tidal.bench.metrics import RequestRecord, summarize
from tidal.bench.traces import TraceRequest, load_trace, synthesize_prompt

logger = logging.getLogger(__name__)

LAG_WARN_S = 0.05
CLIENT_CPU_WARN_CORES = 0.8  # above this the client, not the server, may be what the numbers show
WORDS = ("tide moon sea shore wave sand wind salt boat harbor light storm current reef gull island "
         "anchor sail deep north").split()


@dataclass(frozen=True)
class BenchConfig:
    url: str
    workload: str = "chat"  # chat | synthetic | trace
    model: str | None = None  # None: the server's first model
    arrival: str = "poisson"
    rate: float = 1.0  # requests (synthetic) or sessions (chat) per second
    burstiness: float = ArrivalShape.burstiness  # the arrival shapes: `tidal.bench.arrivals.ArrivalShape`
    burst_factor: float = ArrivalShape.burst_factor
    burst_s: float = ArrivalShape.burst_s
    calm_s: float = ArrivalShape.calm_s
    amplitude: float = ArrivalShape.amplitude
    period_s: float = ArrivalShape.period_s
    end_rate: float | None = None  # ramp: from `rate` to this over `ramp_s`
    ramp_s: float = ArrivalShape.duration_s
    requests: int = 100  # synthetic
    sessions: int = 10  # chat
    turns: int = 3
    think_s: float = 2.0
    system_words: int = 200
    user_words: int = 30
    input_len: int = 256
    input_len_range: float = 0.0
    output_len: int = 64
    vocab_size: int = 30000
    seed: int = 0
    timeout_s: float = 600.0
    trace: str | None = None  # trace workload: the file
    trace_format: str = "auto"  # mooncake | azure | auto (by extension)
    time_scale: float = 1.0  # trace timestamps x this (2.0: half speed)
    max_input_len: int | None = None  # trace: cap prompt lengths (small models)
    max_output_len: int | None = None
    output: str | None = None
    slo: tuple[tuple[str, float], ...] = ()
    max_concurrency: int | None = None  # at most this many requests (or sessions) in flight; later ones wait
    duration_s: float | None = None  # no arrivals (requests, sessions' starts; a closed loop's starts) from then on
    client_index: int = 0  # this client's share of a run split over `num_clients` processes (tidal.bench.clients)
    num_clients: int = 1  # request and session numbers are i * num_clients + client_index: unique over the run
    progress: bool = True  # a progress bar when stdout is a terminal
    start_at: float | None = None  # the run's clock starts at this time.perf_counter() (shared by client processes)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.records: list[RequestRecord] = []
        self.start = 0.0
        self.duration_s = 0.0
        self.cpu_s = 0.0  # this process's CPU over the run (all of it is the load generator's)
        self.model = config.model
        self._progress = None
        self._task = None
        self._slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

    def _start_progress(self, total: int) -> None:
        """A progress bar on a terminal (finished requests, or sessions for chat)."""
        if not (self.config.progress and sys.stdout.isatty()):
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=True)
        self._task = self._progress.add_task(self.config.workload, total=total)
        self._progress.start()

    def _advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    async def run(self) -> dict:
        c = self.config
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=c.timeout_s)
        async with aiohttp.ClientSession(base_url=c.url, timeout=timeout, connector=connector) as client:
            if self.model is None:
                async with client.get("/v1/models") as response:
                    self.model = (await response.json())["data"][0]["id"]
            trace = []
            if c.workload == "trace":
                if not c.trace:
                    raise ValueError("the trace workload needs a trace file")
                trace = load_trace(c.trace, c.trace_format, c.time_scale, c.requests, c.max_input_len,
                                   c.max_output_len)
                arrivals = iter([r.time_s for r in trace])
            else:
                arrivals = make_arrivals(c.arrival, c.rate, self.rng, burstiness=c.burstiness,
                                         burst_factor=c.burst_factor, burst_s=c.burst_s, calm_s=c.calm_s,
                                         amplitude=c.amplitude, period_s=c.period_s, end_rate=c.end_rate,
                                         duration_s=c.ramp_s)
            count = {"chat": c.sessions, "synthetic": c.requests, "trace": len(trace)}.get(c.workload)
            if count is None:
                raise ValueError(f"unknown workload {c.workload!r}: chat, synthetic or trace")
            system = _words(self.rng, c.system_words)
            if c.num_clients > 1:  # one system prompt for all clients; their own arrivals and prompts
                self.rng.seed(c.seed * 1_000_003 + c.client_index, version=2)
            self._start_progress(count)
            if c.start_at is not None:
                await asyncio.sleep(max(0.0, c.start_at - time.perf_counter()))
            cpu_start = time.process_time()
            self.start = time.perf_counter() if c.start_at is None else c.start_at
            tasks = []
            for i, at in zip(range(count), arrivals):
                if c.duration_s is not None and at >= c.duration_s:
                    break
                delay = self.start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                number = i * c.num_clients + c.client_index
                if c.workload == "chat":
                    work = self._session(client, number, at, system)
                elif c.workload == "trace":
                    work = self._replay(client, number, at, trace[i])
                else:
                    work = self._synthetic(client, number, at)
                tasks.append(asyncio.create_task(self._limited(work)))
            await asyncio.gather(*tasks)
            self.duration_s = time.perf_counter() - self.start
            self.cpu_s = time.process_time() - cpu_start
            if self._progress is not None:
                self._progress.stop()
        summary = summarize(self.records, self.duration_s, dict(c.slo), offered_rate=c.rate)
        summary.update(client_cpu(self.cpu_s, self.duration_s))
        write_run(c, self.model, self.records, summary)
        return summary

    async def _limited(self, work) -> None:
        """Run `work` once a concurrency slot is free (at once without `max_concurrency`). In a closed
        loop a request starts when it gets its slot, so `duration_s` ends the loop there: nothing
        starts after it (the requests still running finish)."""
        if self._slots is None:
            return await work
        async with self._slots:
            duration_s = self.config.duration_s
            if duration_s is not None and time.perf_counter() - self.start >= duration_s:
                work.close()
                return
            await work

    def _record(self, request_id: str, scheduled_s: float, input_tokens: int, **kw) -> RequestRecord:
        record = RequestRecord(request_id=request_id, sent_s=0.0, scheduled_s=scheduled_s,
                               input_tokens=input_tokens, **kw)
        self.records.append(record)
        return record

    def _check_lag(self, record: RequestRecord) -> None:
        if self._slots is not None:
            return  # a closed loop: requests wait for a free slot on purpose, not for the client
        lag = record.sent_s - record.scheduled_s
        if lag > LAG_WARN_S:
            logger.warning("request %s sent %.0f ms behind schedule: the client is falling behind",
                           record.request_id, lag * 1e3)

    async def _synthetic(self, client: aiohttp.ClientSession, i: int, at: float) -> None:
        c = self.config
        spread = int(c.input_len * c.input_len_range)
        n = max(1, c.input_len + (self.rng.randint(-spread, spread) if spread else 0))
        prompt = [self.rng.randrange(c.vocab_size) for _ in range(n)]
        await self._completion(client, f"synthetic-{i}", at, prompt, c.output_len)

    async def _replay(self, client: aiohttp.ClientSession, i: int, at: float, request: TraceRequest) -> None:
        prompt = synthesize_prompt(request, self.config.vocab_size, self.rng)
        await self._completion(client, f"trace-{i}", at, prompt, request.output_len)

    async def _completion(self, client: aiohttp.ClientSession, request_id: str, at: float, prompt: list[int],
                          max_tokens: int) -> None:
        """One token-id prompt on /v1/completions, exactly `max_tokens` long (ignore_eos)."""
        record = self._record(request_id, at, len(prompt))
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.0}
        await stream_request(client, "/v1/completions", body, record, self.start)
        self._check_lag(record)
        self._advance()

    async def _session(self, client: aiohttp.ClientSession, session: int, at: float, system: str) -> None:
        c = self.config
        rng = random.Random(c.seed * 1_000_003 + session)
        messages = [{"role": "system", "content": system}]
        scheduled = at
        for turn in range(c.turns):
            messages.append({"role": "user", "content": f"({session}.{turn}) " + _words(rng, c.user_words)})
            # input_tokens: words until the server's usage report replaces them with its token count
            words = sum(len(m["content"].split()) for m in messages)
            record = self._record(f"chat-{session}-{turn}", scheduled, words, session=session, turn=turn)
            body = {"model": self.model, "messages": messages, "max_tokens": c.output_len, "temperature": 0.0}
            reply = await stream_request(client, "/v1/chat/completions", body, record, self.start)
            self._check_lag(record)
            if record.status != "ok":
                break  # a session whose turn failed ends there
            messages.append({"role": "assistant", "content": reply})
            if turn + 1 < c.turns:
                think = rng.expovariate(1 / c.think_s) if c.think_s > 0 else 0.0
                await asyncio.sleep(think)
                scheduled = time.perf_counter() - self.start
        self._advance()


def client_cpu(cpu_s: list[float] | float, duration_s: float) -> dict:
    """The load generator's own CPU, per client process, in cores (1.0: one busy core), and a warning
    when one of them was near a full core (a single-threaded asyncio client then lags the server)."""
    per_process = [s / max(duration_s, 1e-9) for s in (cpu_s if isinstance(cpu_s, list) else [cpu_s])]
    busiest = max(per_process)
    warning = None
    if busiest > CLIENT_CPU_WARN_CORES:
        warning = (f"the load generator used {busiest:.2f} of a core (> {CLIENT_CPU_WARN_CORES:g}): these numbers "
                   f"may be client-bound; run it from more processes (tidal bench --processes K)")
        logger.warning(warning)
    return {"client_processes": len(per_process), "client_cpu_cores": sum(per_process),
            "client_cpu_cores_max": busiest, "client_warning": warning}


def write_run(config: BenchConfig, model: str | None, records: list[RequestRecord], summary: dict) -> None:
    """records.jsonl, summary.json and the plots into `config.output` (nothing without one)."""
    if not config.output:
        return
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "records.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record.to_json()) + "\n")
    settings = {k: v for k, v in config.__dict__.items()}
    (out / "summary.json").write_text(json.dumps({"config": settings, "model": model, **summary}, indent=1))
    from tidal.bench.plots import plot_run  # matplotlib loads only when a run is written

    plot_run(out)
