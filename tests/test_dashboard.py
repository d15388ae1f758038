"""The Grafana dashboard (deploy/grafana/tidal-dashboard.json) against a live server and a real Prometheus.

One `tidal serve` of the embedded model in the shape that has every panel's metrics: a prefill and a
decode worker (so remote prefills, KV transfers and the disaggregation panels have series) and the
SLA planner (its targets), with a planner that cannot act (min = max workers, no flips: it only
exports its targets). A real Prometheus (Debian's `prometheus` package; `.ci/run` installs it)
scrapes it every second while some traffic runs (prompts above and below the local-prefill
threshold, streamed and not); then every panel's every expression, read from the dashboard with
its template variables filled in, is queried through Prometheus's HTTP API and must return data
(at least one series, at least one finite value).

Panels on events that this run has none of (migrations, restarts, preemptions, failed transfers)
still have series: those counters start at 0 for every reason or worker, so the panels show 0 and
are checked like the others. No panel is shape-specific within this deployment; an aggregated
deployment has no `tidal_planner_target_workers` (planner) and zero remote prefills.

Skipped when the prometheus binary is missing, unless `CI` is set (then it fails).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import httpx
import yaml
from _cluster import find_binary
from _server import REPO_ROOT, running_server

from tidal.runtime.ports import free_port

MODEL = "SmolLM2-135M-Instruct"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "tidal-dashboard.json"
SCRAPE_INTERVAL_S = 1
RATE_WINDOW = "1m"  # what `$__rate_interval` becomes
LONG_TEXT = "The tide comes in twice a day, pulled by the moon and the sun. " * 12  # > the threshold
DEPLOYMENT = {
    "model": None,
    "frontend": {"host": "127.0.0.1", "router": "kv", "api_servers": 1},
    "disaggregation": {"local_prefill_threshold": 64},
    "engine": {"kv_cache_memory_gib": 0.125, "token_budget": 256},
    "workers": [{"role": "prefill", "num_threads": 1}, {"role": "decode", "num_threads": 1}],
    "planner": {"slo": {"ttft_ms": 5000, "itl_ms": 1000}, "max_workers": 2, "min_prefill": 1, "min_decode": 1,
                "allow_flips": False, "reactive_interval_s": 1.0, "devices": [], "actuator": "local"},
}


def dashboard_queries(dashboard: dict, model_name: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, template variables filled in as Grafana
    would for "All" (`$worker_id`), one model (`$model_name`) and the rate window."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expr = (target["expr"].replace("$__rate_interval", RATE_WINDOW).replace("$model_name", model_name)
                    .replace("$worker_id", ".*"))
            assert "$" not in expr, f"{panel['title']}: a template variable the test does not know: {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_is_a_grafana_dashboard_with_known_variables():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model_name", "worker_id"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dashboard["panels"] if p["type"] == "timeseries"}
    for wanted in ("Time to first token", "Inter-token latency", "Tokens / s", "Queues", "KV cache usage",
                   "Prefix cache hit rate", "Prefill: local vs remote / s", "KV transfer time", "Migrations",
                   "Workers by role"):
        assert wanted in titles
    assert len(dashboard_queries(dashboard, MODEL)) >= 25


class Prometheus:
    """A prometheus server scraping `target` (host:port) every second, on a free port, data in `tmp`."""

    def __init__(self, binary: str, target: str, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [{"job_name": "tidal", "static_configs": [{"targets": [target]}]}]}))
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.log_path.read_text()[-2000:]}"
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        reply = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _traffic(url: str) -> int:
    """Long prompts (remote prefill) and short ones (local), streamed and not; returns the count sent."""
    bodies = []
    for i in range(8):
        # A long prompt starts with its own words, so its blocks are not cached and it prefills remotely.
        content = f"Question {i}: {LONG_TEXT}" if i % 2 == 0 else f"Say {i}."
        bodies.append({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
                       "temperature": 0, "stream": i % 3 == 0})
    with httpx.Client(base_url=url, timeout=300) as client:
        for body in bodies:
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
    return len(bodies)


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_panel_has_data_from_a_live_server(tmp_path):
    binary = find_binary("prometheus", package="prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump(DEPLOYMENT))
    with running_server(["-f", str(config)], tmp_path / "server.log") as url:
        prometheus = Prometheus(binary, url.removeprefix("http://"), tmp_path)
        try:
            prometheus.wait_ready()
            _wait_for(lambda: prometheus.query('up{job="tidal"} == 1'), "prometheus never scraped the server")
            sent = _traffic(url)
            _wait_for(lambda: _scraped_all(prometheus, sent), "prometheus never scraped the traffic")
            time.sleep(2 * SCRAPE_INTERVAL_S)  # and one more scrape after them, for rate()
            missing = []
            for title, expr in dashboard_queries(dashboard, MODEL):
                result = prometheus.query(expr)
                if not result or not _finite(result):
                    missing.append((title, expr, result))
            assert not missing, "panels without data:\n" + "\n".join(map(str, missing))
        finally:
            prometheus.stop()


def _wait_for(condition, message: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.5)


def _scraped_all(prometheus: Prometheus, sent: int) -> bool:
    result = prometheus.query(f'sum(tidal_requests_total{{model_name="{MODEL}",status="success"}})')
    return bool(result) and float(result[0]["value"][1]) >= sent
