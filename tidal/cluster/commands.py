"""The command lines of `tidal worker`, `tidal frontend` and `tidal planner` (wired into `tidal.cli`).

Every flag defaults to None ("not given"), so `tidal.cluster.config.resolve` can tell a flag that
overrides the `--config` file from one left at its default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tidal.deploy.config import DeploymentError, redacted
from tidal.deploy.engine_knobs import add_engine_flags, engine_knobs_from_args
from tidal.deploy.server_flags import add_server_flags, server_overrides
from tidal.logs import LOG_FORMATS, configure_logging
from tidal.protocol import ROLES
from tidal.router.policy import POLICIES
from tidal.runtime.loop import run as run_loop

logger = logging.getLogger(__name__)

COMMANDS = ("worker", "frontend", "planner")
# `tidal serve`'s worker flags that default to something; here they must default to None.
_WORKER_FLAG_DEFAULTS = ("device", "tensor_parallel_size")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML with a cluster: section (and the sections this "
                                                  "command needs); flags override it")
    p.add_argument("--etcd", default=None, help="etcd endpoint URL(s), comma-separated (http://HOST:2379)")
    p.add_argument("--nats", default=None, help="NATS URL(s), comma-separated (nats://HOST:4222)")
    p.add_argument("--namespace", default=None, help="keeps deployments sharing etcd and NATS apart")
    p.add_argument("--lease-ttl-s", type=int, default=None, help="a dead worker leaves etcd this long after")
    p.add_argument("--curve-key-dir", default=None, help="folder with the cluster's ZMQ CURVE keys (a mounted "
                                                         "secret; python -m tidal.cluster.keys DIR writes one)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default=None, choices=LOG_FORMATS,
                   help="text or json lines (default: the config's frontend.log_format, text)")


def add_commands(sub) -> None:
    worker = sub.add_parser("worker", help="one worker that registers in etcd (cluster mode)")
    add_engine_flags(worker)
    worker.set_defaults(**{name: None for name in _WORKER_FLAG_DEFAULTS})
    _add_cluster_args(worker)
    worker.add_argument("--role", default=None, choices=ROLES)
    worker.add_argument("--worker-id", default=None, help="its name in discovery (default HOSTNAME-PID)")
    worker.add_argument("--host", default=None, help="bind address of the request socket, KV server and "
                                                     "health endpoint (default: $POD_IP, else the address "
                                                     "towards etcd; 0.0.0.0 with a warning)")
    worker.add_argument("--port", type=int, default=None, help="request socket port (default 0: a free one)")
    worker.add_argument("--advertise-host", default=None, help="the host peers dial (default --host, or for a "
                                                               "wildcard this machine's address towards etcd)")
    worker.add_argument("--kv-port", type=int, default=None, help="zmq KV server port (default 0: a free one)")
    worker.add_argument("--health-port", type=int, default=None, help="serve /live and /health here (probes)")
    worker.add_argument("--stop-grace-s", type=float, default=None,
                        help="after SIGTERM, how long requests may take to finish (default 30)")
    worker.add_argument("--stats-log-interval-s", type=float, default=None,
                        help="log a line of the engine's stats this often, when it ran (default 10; 0: never)")
    worker.add_argument("--kv-transfer-backend", default=None, choices=["auto", "zmq", "shm", "cuda_ipc", "fake"],
                        help="auto: zmq on CPU (across hosts); shm and cuda_ipc reach this host only")

    frontend = sub.add_parser("frontend", help="router + OpenAI HTTP frontend over the workers in etcd")
    _add_cluster_args(frontend)
    frontend.add_argument("--model", default=None, help="the model the workers serve, for its tokenizer "
                                                        "(default: the embedded SmolLM2)")
    frontend.add_argument("--tokenizer", default=None, help="folder with tokenizer.json, or a .gguf file")
    frontend.add_argument("--served-model-name", "--model-name", dest="served_model_name", default=None,
                          help="the API's model name (default: what the first worker reports)")
    frontend.add_argument("--host", default=None)
    frontend.add_argument("--port", type=int, default=None)
    frontend.add_argument("--router", default=None, choices=POLICIES)
    frontend.add_argument("--disable-log-requests", action="store_true", default=None,
                          help="no log line per finished request (frontend.log_requests: false)")
    frontend.add_argument("--observation-interval-s", type=float, default=None,
                          help="publish a planner observation this often (default planner.reactive_interval_s)")
    add_server_flags(frontend)

    planner = sub.add_parser("planner", help="the SLA planner on a frontend's observations (NATS)")
    _add_cluster_args(planner)
    planner.add_argument("--host", default=None, help="/metrics and /health address (default 127.0.0.1)")
    planner.add_argument("--port", type=int, default=None, help="/metrics and /health port (default 9091)")
    planner.add_argument("--actuator", default=None, choices=["log", "kubernetes"])


def _cluster_overrides(args: argparse.Namespace) -> dict:
    return {"cluster": {"etcd": [u.strip() for u in args.etcd.split(",") if u.strip()] if args.etcd else None,
                        "nats": args.nats, "namespace": args.namespace, "lease_ttl_s": args.lease_ttl_s,
                        "curve_key_dir": args.curve_key_dir}}


def _worker_overrides(args: argparse.Namespace) -> dict:
    engine = engine_knobs_from_args(args)
    worker = {"role": args.role, "worker_id": args.worker_id, "host": args.host, "port": args.port,
              "advertise_host": args.advertise_host, "kv_port": args.kv_port, "device": args.device,
              "health_port": args.health_port, "stop_grace_s": args.stop_grace_s,
              "stats_log_interval_s": args.stats_log_interval_s,
              "tensor_parallel_size": args.tensor_parallel_size, "num_threads": args.num_threads}
    return {**_cluster_overrides(args), "model": args.model, "tokenizer": args.tokenizer,
            "served_model_name": args.served_model_name, "engine": engine, "worker": worker,
            "kv_transfer": {"backend": args.kv_transfer_backend}}


def _frontend_overrides(args: argparse.Namespace) -> dict:
    return {**_cluster_overrides(args), "model": args.model, "tokenizer": args.tokenizer,
            "served_model_name": args.served_model_name, "observation_interval_s": args.observation_interval_s,
            "frontend": {"host": args.host, "port": args.port, "router": args.router,
                         "log_level": args.log_level if args.log_level != "info" else None,
                         "log_requests": False if args.disable_log_requests else None,
                         **server_overrides(args)}}


def _planner_overrides(args: argparse.Namespace) -> dict:
    return {**_cluster_overrides(args), "planner": {"host": args.host, "port": args.port, "actuator": args.actuator}}


def run_command(args: argparse.Namespace) -> int:
    from tidal.cluster.config import resolve

    overrides = {"worker": _worker_overrides, "frontend": _frontend_overrides,
                 "planner": _planner_overrides}[args.command](args)
    overrides.setdefault("frontend", {})["log_format"] = args.log_format
    need = ("nats",) if args.command == "planner" else ("etcd", "nats")
    try:
        settings = resolve(args.config, overrides, need)
    except DeploymentError as exc:
        print(f"tidal {args.command}: {exc}", file=sys.stderr)
        return 2
    log_format = settings.frontend.log_format
    configure_logging(args.log_level, log_format)
    logger.info("%s settings: %s", args.command, redacted(settings.model_dump(exclude_defaults=True)))
    if args.command == "worker":
        from tidal.cluster.worker_main import run
        return run(settings, args.log_level, log_format)
    try:
        if args.command == "frontend":
            from tidal.cluster.frontend_main import serve_frontend
            run_loop(serve_frontend(settings))
        else:
            from tidal.cluster.planner_main import serve_planner
            asyncio.run(serve_planner(settings))
    except KeyboardInterrupt:
        pass
    return 0
