"""The metrics an operator's dashboard reads (docs/metrics.md): the request metrics labelled with the
served model, finish reasons, the KV cache usage ratio, and the router's per-worker series (KV usage,
preemptions, token and KV-transfer counters) and pool sizes.

In-process: the HTTP app over a scripted engine, and a router over stub workers, scraped as text.
"""

from __future__ import annotations

import logging

import openai
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_frontend_unit import MODEL, ScriptedEngine, chat_body, live_server, make_app
from test_request_log import _post

from tidal.frontend.detokenizer import TokenTextTable
from tidal.frontend.metrics import FINISH_REASONS, FrontendMetrics
from tidal.frontend.serving import GenerationRun, ServingContext
from tidal.protocol import AddRequest, EngineStats, SamplingParams
from tidal.router.config import RouterConfig
from tidal.router.service import Router
from tidal.router.workers import Worker
from tidal.runtime.discovery import LocalDiscovery


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_request_metrics_carry_the_model_and_finish_reasons_count():
    engine = ScriptedEngine()
    app = make_app(engine)
    assert (await _post(app, chat_body(max_tokens=4))).status_code == 200  # length
    assert (await _post(app, chat_body(stop=["capital"]))).status_code == 200  # stop (a stop string)
    assert (await _post(app, chat_body())).status_code == 200  # stop (eos)
    engine.fail_with = RuntimeError("boom")
    assert (await _post(app, chat_body())).status_code == 500
    samples = _samples(app.state.serving_context.metrics.render().decode())
    model = ("model_name", MODEL)

    def finished(reason: str) -> float:
        return samples[("tidal_request_finish_reasons_total", (("finish_reason", reason), model))]
    assert (finished("length"), finished("stop"), finished("error"), finished("abort")) == (1, 2, 1, 0)
    assert finished("tool_calls") == 0  # every known reason has its series from the start
    assert samples[("tidal_requests_total", (model, ("status", "success")))] == 3
    assert samples[("tidal_requests_total", (model, ("status", "error")))] == 1
    for name in ("tidal_request_ttft_seconds_count", "tidal_request_e2e_seconds_count",
                 "tidal_request_itl_seconds_count", "tidal_prompt_tokens_total", "tidal_generation_tokens_total",
                 "tidal_prefix_cache_hit_tokens_total"):
        assert samples[(name, (model,))] > 0, name
    # Every request metric is labelled: no unlabelled request series is left.
    assert not [key for key in samples if key[0].startswith(("tidal_request_", "tidal_requests")) and not
                any(label == "model_name" for label, _ in key[1])]
    assert samples[("tidal_kv_cache_usage_ratio", ())] == 3 / 40


async def test_the_finish_reason_the_endpoint_sets_on_the_last_step_is_the_one_counted():
    """The contract for the chat layer's `tool_calls`: set `run.finish_reason` while handling the
    step that carries the finish reason; the metric (and the request's log line) take it."""
    engine = ScriptedEngine()
    metrics = FrontendMetrics(engine, MODEL)
    ctx = ServingContext(engine=engine, tokenizer=engine.tokenizer, served_model_name=MODEL, metrics=metrics,
                         token_table=TokenTextTable(engine.tokenizer))
    request = AddRequest(request_id="r1", prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=50),
                         arrival_time=0.0)
    run = GenerationRun(ctx, request)
    async for step in run.steps():
        if step.finish_reason is not None:
            run.finish_reason = "tool_calls"
    samples = _samples(metrics.render().decode())
    counted = {labels[0][1]: value for (name, labels), value in samples.items()
               if name == "tidal_request_finish_reasons_total"}
    assert counted == {"stop": 0, "length": 0, "tool_calls": 1, "abort": 0, "error": 0}
    assert set(FINISH_REASONS) == set(counted)


class _Stub:
    """TEST DOUBLE of WorkerClient: a role, health and a fixed load report."""

    drained = False
    ready = None

    def __init__(self, worker_id: str, role: str, stats: EngineStats | None, healthy: bool = True,
                 leaving: bool = False) -> None:
        self.worker_id, self.role, self._stats, self.healthy, self.leaving = worker_id, role, stats, healthy, leaving

    def stats(self) -> EngineStats | None:
        return self._stats

    def is_healthy(self) -> bool:
        return self.healthy

    def request_dump(self) -> None:
        pass


def _stats(used: int, total: int, **counters) -> EngineStats:
    return EngineStats(num_running=1, num_waiting=0, kv_blocks_used=used, kv_blocks_total=total,
                       prefix_cache_hit_tokens=counters.pop("hits", 0), prompt_tokens=counters.pop("prompt", 0),
                       generation_tokens=0, **counters)


def test_the_router_exports_each_worker_s_kv_usage_counters_and_the_pool_sizes():
    router = Router(LocalDiscovery(), RouterConfig())
    try:
        workers = {
            "d0": _Stub("d0", "decode", _stats(25, 100, preemptions_total=3, kv_transfers=2, kv_transfer_bytes=4096,
                                               kv_transfer_seconds=0.5, kv_transfer_failures=1, hits=30, prompt=90,
                                               grammar_seconds_total=0.25)),
            "d1": _Stub("d1", "decode", _stats(0, 100), leaving=True),
            "p0": _Stub("p0", "prefill", _stats(50, 200)),
            "p1": _Stub("p1", "prefill", None, healthy=False),  # not connected: no report yet
        }
        for worker_id, stub in workers.items():
            router.workers[worker_id] = Worker(stub)
        samples = _samples(generate_latest(router.registry).decode())
        d0, p0 = (("role", "decode"), ("worker_id", "d0")), (("role", "prefill"), ("worker_id", "p0"))
        assert samples[("tidal_worker_kv_usage_ratio", d0)] == 0.25
        assert samples[("tidal_worker_kv_usage_ratio", p0)] == 0.25
        assert samples[("tidal_worker_kv_blocks_total", p0)] == 200
        assert samples[("tidal_worker_preemptions_total", d0)] == 3
        assert samples[("tidal_worker_grammar_seconds_total", d0)] == 0.25
        assert samples[("tidal_worker_kv_transfers_total", d0)] == 2
        assert samples[("tidal_worker_kv_transfer_bytes_total", d0)] == 4096
        assert samples[("tidal_worker_kv_transfer_seconds_total", d0)] == 0.5
        assert samples[("tidal_worker_kv_transfer_failures_total", d0)] == 1
        assert samples[("tidal_worker_prefix_cache_hit_tokens_total", d0)] == 30
        assert samples[("tidal_worker_prompt_tokens_total", d0)] == 90
        assert not [key for key in samples if ("worker_id", "p1") in key[1]]  # no report, no per-worker series

        def pool(role: str, state: str) -> float:
            return samples[("tidal_workers", (("role", role), ("state", state)))]
        assert (pool("decode", "routable"), pool("decode", "draining"), pool("decode", "down")) == (1, 1, 0)
        assert (pool("prefill", "routable"), pool("prefill", "draining"), pool("prefill", "down")) == (1, 0, 1)
        assert (pool("both", "routable"), pool("both", "draining"), pool("both", "down")) == (0, 0, 0)
    finally:
        router.fleet.events.close()


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_of_tool_calls_counts_as_tool_calls_in_the_metric_and_the_log(stream, n, caplog):
    from test_tool_calls import ASK, HERMES_REPLY, TOOLS, ask, scripted

    caplog.set_level(logging.INFO, logger="tidal.requests")
    engine = scripted(HERMES_REPLY)
    app = make_app(engine)
    async with (live_server(app) as url,
                openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client):
        if n == 1:
            _, finish_reason, _ = await ask(client, stream, tools=TOOLS)
            finish_reasons = [finish_reason]
        elif not stream:
            reply = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, n=n)
            finish_reasons = [choice.finish_reason for choice in reply.choices]
        else:
            chunks = [c async for c in await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                                            n=n, stream=True)]
            finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish_reasons == ["tool_calls"] * n
    samples = _samples(app.state.serving_context.metrics.render().decode())
    model = ("model_name", MODEL)
    assert samples[("tidal_request_finish_reasons_total", (("finish_reason", "tool_calls"), model))] == n
    assert samples[("tidal_request_finish_reasons_total", (("finish_reason", "stop"), model))] == 0
    lines = [r for r in caplog.records if r.name == "tidal.requests"]  # one per choice
    assert [line.fields["finish_reason"] for line in lines] == ["tool_calls"] * n
