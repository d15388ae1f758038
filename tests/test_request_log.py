"""The operator's log: one line per request (`tidal.frontend.request_log`), text or JSON lines
(`tidal.logs`), the route a request took (`Router.route_of`) and the workers' periodic engine line
(`tidal.worker.stats_log`).

In-process: the HTTP app over a scripted engine (how each way a request ends is logged: finished,
stopped by a stop string, the engine's error, the client gone, a 400 refusal; none with
`log_requests` off), the router's route of a request (agg, local, remote), the stats line's
cadence. End to end: `tidal serve --log-format json --stats-log-interval-s 1` on the embedded
model writes JSON lines, a request's line with its worker and token counts, and engine lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from _server import REPO_ROOT, running_server
from test_frontend_unit import ScriptedEngine, chat_body, endless_script, live_server, make_app

from tidal.config import ServerConfig
from tidal.frontend.request_log import RequestLog
from tidal.logs import JsonLineFormatter, configure_logging
from tidal.protocol import AddRequest, EngineStats, SamplingParams
from tidal.router.config import RouterConfig
from tidal.router.policy import DisaggPolicy
from tidal.router.service import Router
from tidal.router.workers import Worker
from tidal.runtime.discovery import LocalDiscovery
from tidal.worker.stats_log import EngineStatsLog


def _lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tidal.requests"]


# ---- the line itself -------------------------------------------------------------------------


def test_a_finished_line_is_key_value_pairs_and_json_fields(caplog):
    caplog.set_level(logging.INFO, logger="tidal.requests")
    RequestLog().finished("r1", 200, "stop", None, prompt_tokens=12, cached_tokens=8, output_tokens=3,
                          ttft_s=0.0123, e2e_s=0.5)
    [record] = _lines(caplog)
    assert record.getMessage() == ("finished request_id=r1 status=200 finish_reason=stop migrations=0 "
                                   "prompt_tokens=12 cached_tokens=8 output_tokens=3 ttft_ms=12.3 e2e_ms=500.0")
    line = json.loads(JsonLineFormatter("api-server 0").format(record))
    assert line["level"] == "INFO" and line["logger"] == "tidal.requests" and line["process"] == "api-server 0"
    assert line["msg"] == record.getMessage() and line["ts"].endswith("+00:00")
    assert line["event"] == "finished" and line["request_id"] == "r1" and line["ttft_ms"] == 12.3
    assert line["route"] is None and line["worker"] is None


def test_a_refusal_quotes_its_message_and_cuts_it(caplog):
    caplog.set_level(logging.INFO, logger="tidal.requests")
    RequestLog().refused("/v1/completions", 400, "BadRequestError", 'bad "x"\n' + "y" * 500, param="prompt")
    [record] = _lines(caplog)
    text = record.getMessage()
    assert text.startswith('refused path=/v1/completions status=400 error=BadRequestError param=prompt '
                           'message="bad \\"x\\"\\nyyy')
    assert len(text) < 300


def test_off_when_disabled_or_the_logger_is_quieter(caplog):
    caplog.set_level(logging.INFO, logger="tidal.requests")
    RequestLog(enabled=False).finished("r1", 200, "stop", None, 1, 0, 1, 0.1, 0.2)
    caplog.set_level(logging.WARNING, logger="tidal.requests")
    RequestLog().finished("r2", 200, "stop", None, 1, 0, 1, 0.1, 0.2)
    assert _lines(caplog) == []


def test_configure_logging_writes_json_lines_to_stderr_and_replaces_itself(capsys):
    root = logging.getLogger()
    level = root.level
    try:
        configure_logging("info", "text", "worker w0")
        configure_logging("info", "json", "worker w0")  # replaces the text handler: one line per record
        logging.getLogger("tidal.test").info("hello %s", "there", extra={"fields": {"answer": 42, "msg": "no"}})
        err = capsys.readouterr().err.strip().splitlines()
        line = json.loads(err[-1])
        assert len([e for e in err if "hello" in e]) == 1
        assert line["msg"] == "hello there" and line["answer"] == 42 and line["process"] == "worker w0"
        with pytest.raises(ValueError, match="log format"):
            configure_logging("info", "xml")
    finally:
        for handler in [h for h in root.handlers if type(h).__name__ == "_StderrHandler"]:
            root.removeHandler(handler)
        root.setLevel(level)


# ---- each way a request ends, through the app ------------------------------------------------


async def _post(app, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post("/v1/chat/completions", json=body)


async def test_every_way_a_request_ends_gets_one_line(caplog):
    caplog.set_level(logging.INFO, logger="tidal.requests")
    engine = ScriptedEngine()
    app = make_app(engine)
    assert (await _post(app, chat_body(max_tokens=4))).status_code == 200
    assert (await _post(app, chat_body(stop=["capital"], stream=True))).status_code == 200
    assert (await _post(app, chat_body(model="nope"))).status_code == 404
    engine.fail_with = RuntimeError("boom")
    assert (await _post(app, chat_body())).status_code == 500
    fields = [r.fields for r in _lines(caplog)]
    assert [f["event"] for f in fields] == ["finished", "finished", "refused", "finished"]
    length, stopped, refused, failed = fields
    assert length["status"] == 200 and length["finish_reason"] == "length" and length["output_tokens"] == 4
    assert length["prompt_tokens"] == len(engine.requests[0].prompt_token_ids) and length["cached_tokens"] == 8
    assert length["ttft_ms"] > 0 and length["e2e_ms"] >= length["ttft_ms"] and length["route"] is None
    assert stopped["finish_reason"] == "stop" and stopped["status"] == 200
    assert refused["status"] == 404 and refused["path"] == "/v1/chat/completions"
    assert failed["status"] == 500 and failed["finish_reason"] == "error" and failed["ttft_ms"] is None


async def test_a_client_that_goes_away_is_logged_as_499_abort(caplog):
    caplog.set_level(logging.INFO, logger="tidal.requests")
    engine = ScriptedEngine(delay_s=0.01)
    engine.script = endless_script
    async with live_server(make_app(engine)) as url, httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as reply:
            async for _ in reply.aiter_bytes():
                break
        deadline = time.monotonic() + 10
        while not _lines(caplog):
            assert time.monotonic() < deadline, "no line for the abandoned request"
            await asyncio.sleep(0.02)
    [record] = _lines(caplog)
    assert record.fields["status"] == 499 and record.fields["finish_reason"] == "abort"


async def test_no_lines_with_log_requests_off(caplog):
    caplog.set_level(logging.INFO, logger="tidal.requests")
    app = make_app(ScriptedEngine(), log_requests=False)
    assert (await _post(app, chat_body())).status_code == 200
    assert (await _post(app, chat_body(model="nope"))).status_code == 404
    assert _lines(caplog) == []
    assert ServerConfig().log_requests and ServerConfig().log_format == "text"


# ---- the route, from the router --------------------------------------------------------------


class _Stub:
    """TEST DOUBLE of WorkerClient for routing decisions only: a role, health and a load report."""

    leaving = drained = False
    ready = None

    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id, self.role = worker_id, role

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=1000,
                           prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0)

    def is_healthy(self) -> bool:
        return True

    def request_dump(self) -> None:
        pass


def _router(*roles: str) -> Router:
    config = RouterConfig(disagg=DisaggPolicy(local_prefill_threshold=32))
    router = Router(LocalDiscovery(), config)
    for i, role in enumerate(roles):
        worker = router.workers[f"{role}-{i}"] = Worker(_Stub(f"{role}-{i}", role))
        router.index.add_worker(worker.worker_id)
    return router


def _request(request_id: str, num_tokens: int) -> AddRequest:
    return AddRequest(request_id=request_id, prompt_token_ids=list(range(1, num_tokens + 1)),
                      sampling_params=SamplingParams(max_tokens=4))


async def test_the_router_tells_where_an_admitted_request_runs():
    aggregated = _router("both")
    disaggregated = _router("prefill", "decode")
    try:
        await aggregated.admit(_request("a", 40))
        await disaggregated.admit(_request("short", 8))
        await disaggregated.admit(_request("long", 200))
        assert aggregated.route_of("a").route == "agg" and aggregated.route_of("a").worker_id == "both-0"
        short, long = disaggregated.route_of("short"), disaggregated.route_of("long")
        assert (short.route, short.worker_id, short.prefill_worker_id) == ("local", "decode-1", None)
        assert (long.route, long.worker_id, long.prefill_worker_id) == ("remote", "decode-1", "prefill-0")
        assert long.migrations == 0 and disaggregated.route_of("never-admitted") is None
        for router, request_id in ((aggregated, "a"), (disaggregated, "short"), (disaggregated, "long")):
            router.admission.take(request_id).release()  # its stream would take it; then there is none
            assert router.route_of(request_id) is None
    finally:
        aggregated.fleet.events.close()
        disaggregated.fleet.events.close()


# ---- the periodic engine line ----------------------------------------------------------------


def _stats(steps: int, running: int = 0, generated: int = 0, prompt: int = 0, hits: int = 0,
           preemptions: int = 0) -> EngineStats:
    return EngineStats(num_running=running, num_waiting=0, kv_blocks_used=running * 10, kv_blocks_total=100,
                       prefix_cache_hit_tokens=hits, prompt_tokens=prompt, generation_tokens=generated,
                       steps_total=steps, prefill_tokens_total=prompt - hits, preemptions_total=preemptions)


def test_the_engine_line_comes_every_interval_while_work_runs_and_once_after(caplog):
    caplog.set_level(logging.INFO, logger="tidal.engine.stats")
    log = EngineStatsLog(interval_s=10)
    assert log.observe(_stats(0), now=0.0) is None  # the first look: nothing to compare with
    assert log.observe(_stats(5, running=2, generated=10), now=5.0) is None  # within the interval
    busy = log.observe(_stats(50, running=2, generated=200, prompt=400, hits=100, preemptions=1), now=10.0)
    assert busy["generation_tokens_per_s"] == 20.0 and busy["prefill_tokens_per_s"] == 30.0
    assert busy["prefix_hit_rate"] == 0.25 and busy["kv_usage"] == 0.2 and busy["preemptions"] == 1
    done = log.observe(_stats(60, generated=220, prompt=400, hits=100, preemptions=1), now=20.0)
    assert done["running"] == 0 and done["generation_tokens_per_s"] == 2.0 and done["preemptions"] == 0
    assert log.observe(_stats(60, generated=220, prompt=400, hits=100, preemptions=1), now=30.0) is None  # idle
    assert log.observe(_stats(60, running=1, generated=220, prompt=400, hits=100, preemptions=1), now=40.0)
    messages = [r.getMessage() for r in caplog.records if r.name == "tidal.engine.stats"]
    assert len(messages) == 3
    assert messages[0] == ("engine: prefill 30.0 tok/s, generation 20.0 tok/s, running 2, waiting 0, KV 20.0% "
                           "(20/100 blocks), prefix hits 25.0%, preemptions 1")
    with pytest.raises(ValueError):
        EngineStatsLog(interval_s=0)


# ---- end to end ------------------------------------------------------------------------------


def test_tidal_serve_writes_json_lines_with_request_and_engine_lines(tmp_path):
    log_path = tmp_path / "server.log"
    with running_server(["--log-format", "json", "--stats-log-interval-s", "1", "--num-threads", "1"],
                        log_path) as url:
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
        assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                          timeout=60).status_code == 404
        deadline = time.monotonic() + 30
        while not any(r["logger"] == "tidal.engine.stats" and r["generation_tokens_per_s"] > 0
                      for r in _json_lines(log_path)):
            assert time.monotonic() < deadline, "no engine line of the request's tokens in the log"
            time.sleep(0.2)
    records = _json_lines(log_path)
    assert len(records) > 5
    finished = [r for r in records if r.get("event") == "finished"]
    refused = [r for r in records if r.get("event") == "refused"]
    engine = [r for r in records if r["logger"] == "tidal.engine.stats"]
    assert len(finished) == 1 and len(refused) == 1
    assert finished[0]["route"] == "agg" and finished[0]["worker"] == "both-0" and finished[0]["status"] == 200
    assert finished[0]["output_tokens"] == 3 and finished[0]["finish_reason"] == "length"
    assert refused[0]["status"] == 404 and refused[0]["error"] == "NotFoundError"
    assert engine and all(r["process"] == "worker both-0" for r in engine)


def _json_lines(path) -> list[dict]:
    """Every line of the log, each a JSON object (a line that is not fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_serve_flags_set_the_log_settings_over_a_config():
    from tidal.cli import build_parser, serve_deployment_from_args
    from tidal.deploy.config import DeploymentError

    config = str(REPO_ROOT / "examples" / "disagg.yaml")

    def deployment(*flags: str):
        return serve_deployment_from_args(build_parser().parse_args(["serve", "-f", config, *flags]))

    given = deployment("--log-format", "json", "--disable-log-requests", "--stats-log-interval-s", "0")
    assert given.frontend.log_format == "json" and given.frontend.log_requests is False
    assert [w.stats_log_interval_s for w in given.workers] == [0, 0]
    untouched = deployment()
    assert untouched.frontend.log_format == "text" and untouched.frontend.log_requests
    assert [w.stats_log_interval_s for w in untouched.workers] == [10, 10]
    with pytest.raises(DeploymentError, match="stats_log_interval_s"):
        deployment("--stats-log-interval-s", "-1")
