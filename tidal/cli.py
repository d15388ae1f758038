"""`tidal` command line.

    tidal serve [MODEL] [engine flags]    one aggregated worker behind the OpenAI frontend
    tidal serve -f CONFIG.yaml [--host H] [--port P]
                                          a deployment: frontend, router, prefill/decode workers
    tidal worker --role prefill|decode|both [MODEL] [engine flags] --etcd URL --nats URL [--config FILE]
    tidal frontend --etcd URL --nats URL [--model M] [--host H] [--port P] [--config FILE]
    tidal planner --nats URL [--config FILE] [--port P]
                                          cluster mode: one process each, meeting in etcd and NATS
                                          (tidal/cluster/)
    tidal sim --workers N [--speedup S] [--timing ... | --profile PROFILE.json]
                                          the real frontend + router over N simulated workers
    tidal sim-fleet --workload square|trace|poisson --max-workers N [--planner on|off] [--compare-static]
                                          discrete-event fleet simulator, the SLA planner in the loop
    tidal profile --model MODEL [--device cuda] [--prefill-tokens 128,...] --out PROFILE.json
                                          measure prefill and decode step times; writes a profile
    tidal bench --url URL --workload chat|synthetic --arrival ... --rate R --slo ttft_ms=..,itl_ms=..
                                          load any OpenAI-compatible server; records and a summary
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing

from tidal.config import SIMULATED_WORKER, ReasoningParserName, ToolCallParserName
from tidal.deploy.engine_knobs import add_engine_flags, add_model_flags, engine_knobs_from_args, model_knobs
from tidal.deploy.server_flags import add_server_flags
from tidal.logs import LOG_FORMATS, configure_logging
from tidal.router.policy import POLICIES
from tidal.runtime.loop import run as run_loop

logger = logging.getLogger("tidal")


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, model_option=True)
    p.add_argument("--prefill-tokens", type=_ints, default=None,
                   help="prefill points, tokens per step (default 128,256,512,1024,2048,4096,8192,16384)")
    p.add_argument("--decode-batches", type=_ints, default=None,
                   help="decode points, sequences per step (default 1,2,4,8,16,32,64,128,256)")
    p.add_argument("--decode-contexts", type=_ints, default=None,
                   help="decode points, context tokens per sequence (default 512,1024,2048,4096,8192)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each point first")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill steps per point (median)")
    p.add_argument("--decode-steps", type=int, default=5, help="timed decode steps per point (median)")
    p.add_argument("--itl-targets-ms", type=_floats, default=(20.0, 50.0, 100.0),
                   help="the table shows the largest decode batch within each of these ITLs")
    p.add_argument("--out", default="profile.json", help="the profile file to write")
    p.add_argument("--log-level", default="info")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def engine_config_from_args(args: argparse.Namespace):
    """The model and cache flags as an `EngineConfig` (scheduler settings left at their defaults)."""
    from tidal.deploy.engine_knobs import engine_config

    return engine_config(model_knobs(args), model=args.model, tokenizer=args.tokenizer, device=args.device)


def deployment_from_args(args: argparse.Namespace):
    """`tidal serve MODEL --flags`: one aggregated worker, as a deployment."""
    from tidal.config import rank_devices
    from tidal.deploy.config import parse_deployment

    tp = args.tensor_parallel_size
    devices = list(rank_devices(args.device, tp)) if tp > 1 else [args.device]
    engine = engine_knobs_from_args(args)
    frontend = {"host": args.host or None, "port": args.port, "max_request_body_bytes": args.max_request_body_bytes,
                "log_level": args.log_level, "tool_call_parser": args.tool_call_parser,
                "reasoning_parser": args.reasoning_parser}
    return parse_deployment({
        "model": args.model, "tokenizer": args.tokenizer, "served_model_name": args.served_model_name,
        "frontend": {k: v for k, v in frontend.items() if v is not None},
        "engine": {k: v for k, v in engine.items() if v is not None},
        "workers": [{"role": "both", "devices": devices, "tensor_parallel_size": tp, "num_threads": args.num_threads,
                     **({"stop_grace_s": args.stop_grace_s} if args.stop_grace_s is not None else {})}],
    }, "command line")


def serve_deployment_from_args(args: argparse.Namespace):
    """`tidal serve`'s deployment: the -f file, or one worker from the engine flags; the frontend
    flags over either. Raises DeploymentError."""
    from tidal.deploy.config import load_deployment

    deployment = load_deployment(args.config) if args.config is not None else deployment_from_args(args)
    return with_stats_log_interval(with_frontend(deployment, frontend_flags(args)), args.stats_log_interval_s)


def with_frontend(deployment, values: dict):
    """The deployment with these `frontend` fields set from the command line (validated)."""
    from tidal.deploy.config import parse_deployment

    if not values:
        return deployment
    data = deployment.model_dump(exclude_unset=True)
    data.setdefault("frontend", {}).update(values)
    return parse_deployment(data, "command line")


def frontend_flags(args: argparse.Namespace) -> dict:
    """The `frontend` fields `tidal serve`'s flags set, with -f or without (None: not given)."""
    from tidal.deploy.server_flags import server_overrides

    given = server_overrides(args)
    if args.host:
        given["host"] = args.host  # in the deployment too: the workers' health endpoints bind there
    if args.max_migrations is not None:
        given["max_migrations"] = args.max_migrations
    if args.log_format is not None:
        given["log_format"] = args.log_format
    if args.disable_log_requests:
        given["log_requests"] = False
    return given


def with_stats_log_interval(deployment, interval_s: float | None):
    """The deployment with every worker group's `stats_log_interval_s` set from the command line
    (validated; None: as configured)."""
    from tidal.deploy.config import parse_deployment

    if interval_s is None:
        return deployment
    data = deployment.model_dump(exclude_unset=True)
    for worker in data["workers"]:
        worker["stats_log_interval_s"] = interval_s
    return parse_deployment(data, "command line")


def _add_log_args(serve: argparse.ArgumentParser) -> None:
    """`tidal serve`'s logging flags (docs/metrics.md, "Logs")."""
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", default=None, choices=LOG_FORMATS,
                       help="every process's log lines: text or json (default: the config's frontend.log_format, "
                            "text)")
    serve.add_argument("--disable-log-requests", action="store_true",
                       help="no log line per finished request (frontend.log_requests: false)")
    serve.add_argument("--stats-log-interval-s", type=float, default=None,
                       help="each worker logs a line of its engine's stats this often, when it ran (default: "
                            "the config's workers.N.stats_log_interval_s, 10; 0: never)")


def build_parser() -> argparse.ArgumentParser:
    """Every `tidal` command and its flags (`main` parses with it; tests check manifests against it)."""
    parser = argparse.ArgumentParser(prog="tidal")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API (one worker, or a deployment "
                                         "config with -f)")
    add_engine_flags(serve)
    add_server_flags(serve)
    serve.add_argument("-f", "--config", default=None,
                       help="deployment YAML (frontend, router, workers); the engine flags are then ignored")
    serve.add_argument("--host", default=None, help="frontend address (overrides the config's)")
    serve.add_argument("--port", type=int, default=None, help="frontend port (overrides the config's)")
    _add_log_args(serve)
    serve.add_argument("--api-servers", type=int, default=None,
                       help="frontend processes on the one port, each with its own router replica "
                            "(default: the config's frontend.api_servers, else one per four cores)")
    serve.add_argument("--max-request-body-bytes", type=int, default=None,
                       help="larger bodies get a 413 (default: the config's frontend.max_request_body_bytes, 8 MiB)")
    serve.add_argument("--tool-call-parser", default=None, choices=typing.get_args(ToolCallParserName),
                       help="the format tool calls are read in with tool_choice auto (default auto: the one the "
                            "chat template writes; without -f; with -f: frontend.tool_call_parser)")
    serve.add_argument("--reasoning-parser", default=None, choices=typing.get_args(ReasoningParserName),
                       help="qwen3 or deepseek_r1: <think>...</think> goes to reasoning_content; harmony: "
                            "gpt-oss's channels (chosen anyway for a harmony chat template) (default none; "
                            "without -f; with -f: frontend.reasoning_parser)")
    serve.add_argument("--max-migrations", type=int, default=None,
                       help="times a request may move to another worker when its worker dies or leaves "
                            "mid-stream (default: the config's frontend.max_migrations, 3)")
    serve.add_argument("--stop-grace-s", type=float, default=None,
                       help="after SIGTERM a worker finishes its requests for up to this long (without -f; "
                            "with -f: workers.N.stop_grace_s)")
    _add_sim_args(sub.add_parser("sim", help="the real frontend and router in front of N simulated workers"))
    fleet = sub.add_parser("sim-fleet", help="simulate a prefill/decode fleet of up to hundreds of workers, "
                                             "the SLA planner in the loop (no servers, simulated time)")
    _add_sim_fleet_args(fleet)
    bench = sub.add_parser("bench", help="load an OpenAI-compatible server with chat or synthetic traffic")
    _add_bench_args(bench)
    profile = sub.add_parser("profile", help="measure prefill and decode step times of a model on a device")
    _add_profile_args(profile)
    from tidal.cluster.commands import add_commands

    add_commands(sub)
    return parser


def _add_sim_args(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--workers", type=int, default=8)
    sim.add_argument("--speedup", type=float, default=1.0, help="simulated time runs this many times faster")
    timing = sim.add_mutually_exclusive_group()
    timing.add_argument("--timing", default=None,
                        help="e.g. base_s=0.008,prefill_s_per_token=5e-05 (see tidal/sim/timing.py)")
    timing.add_argument("--profile", default=None, help="step times from a `tidal profile` file instead")
    sim.add_argument("--router", default="kv", choices=POLICIES)
    sim.add_argument("--num-kv-blocks", type=int, default=SIMULATED_WORKER.cache.num_blocks,
                     help="per simulated worker")
    sim.add_argument("--token-budget", type=int, default=SIMULATED_WORKER.scheduler.token_budget)
    sim.add_argument("--queue-timeout-s", type=float, default=None,
                     help="the router's queue_timeout_s (default: RouterConfig's)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--api-servers", type=int, default=1,
                     help="frontend processes on the one port, each with its own router replica")
    sim.add_argument("--sim-worker-processes", type=int, default=None,
                     help="processes the simulated workers run in, dealt round-robin (0: threads of the "
                          "serving process; default: one per worker, at most a quarter of the cores)")
    sim.add_argument("--tokenizer", default=None,
                     help="a tokenizer folder (tokenizer.json) or .gguf instead of the embedded model's")
    sim.add_argument("--log-level", default="info")


def main(argv: list[str] | None = None) -> int:
    from tidal.cluster.commands import COMMANDS as CLUSTER_COMMANDS

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", None) or "text")
    if args.command == "serve":
        from tidal.deploy.config import DeploymentError, redacted
        from tidal.deploy.serve import serve_deployment
        from tidal.deploy.vllm_flags import notes

        if args.config is not None and args.model is not None:
            parser.error("give a MODEL or -f CONFIG, not both")
        try:
            deployment = serve_deployment_from_args(args)
        except DeploymentError as exc:
            print(f"tidal serve: {exc}", file=sys.stderr)
            return 2
        configure_logging(args.log_level, deployment.frontend.log_format)
        for note in notes(args):
            logger.warning(note)
        logger.info("deployment: %s", redacted(deployment.model_dump(exclude_defaults=True)))
        try:
            run_loop(serve_deployment(deployment, args.host, args.port, args.api_servers))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command in CLUSTER_COMMANDS:
        from tidal.cluster.commands import run_command
        return run_command(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "sim":
        return _sim(args)
    if args.command == "sim-fleet":
        return _sim_fleet(args)
    if args.command == "profile":
        return _profile(args)
    return 2


def _sim(args: argparse.Namespace) -> int:
    from tidal.config import ServerConfig
    from tidal.router.config import RouterConfig
    from tidal.perf.profile import load_profile
    from tidal.sim.serve import parse_timing, serve_sim

    try:
        timing = load_profile(args.profile) if args.profile else parse_timing(args.timing)
    except ValueError as exc:
        print(f"tidal sim: {exc}", file=sys.stderr)
        return 2
    try:
        deadline = {} if args.queue_timeout_s is None else {"queue_timeout_s": args.queue_timeout_s}
        run_loop(serve_sim(args.workers, timing, args.speedup, RouterConfig(policy=args.router, **deadline),
                              ServerConfig(host=args.host, port=args.port, log_level=args.log_level),
                              api_servers=args.api_servers, tokenizer=args.tokenizer,
                              worker_processes=_sim_worker_processes(args),
                              num_blocks=args.num_kv_blocks, token_budget=args.token_budget))
    except KeyboardInterrupt:
        pass
    return 0


def _sim_worker_processes(args: argparse.Namespace) -> int:
    """Out of the serving process by default, so its CPU is the frontend's alone; a quarter of the
    cores at most, since each process imports torch and simulated workers mostly sleep."""
    if args.sim_worker_processes is not None:
        return args.sim_worker_processes
    return max(1, min(args.workers, (os.cpu_count() or 1) // 4))


def _add_sim_fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="square", choices=["square", "trace", "poisson"])
    p.add_argument("--planner", default="on", choices=["on", "off"], help="off: only the static split(s)")
    p.add_argument("--profile", default=None, help="step times from a `tidal profile` file (default: the linear "
                                                   "TimingModel)")
    p.add_argument("--max-workers", type=int, default=64, help="the GPU budget, in workers")
    p.add_argument("--ttft-ms", type=float, default=1000.0, help="TTFT p90 target")
    p.add_argument("--itl-ms", type=float, default=50.0, help="ITL target")
    p.add_argument("--duration-s", type=float, default=600.0, help="simulated seconds of arrivals")
    p.add_argument("--calm-s", type=float, default=140.0, help="square: calm phase (0.5x) of each period")
    p.add_argument("--burst-s", type=float, default=60.0, help="square: burst phase (2x) of each period")
    p.add_argument("--trace", default=None, help="trace: a Mooncake .jsonl (default: ../shared/traces/"
                                                 "mooncake_conversation_trace.jsonl)")
    p.add_argument("--startup-s", type=float, default=30.0, help="a new worker's start-up delay")
    p.add_argument("--flip-s", type=float, default=1.0, help="a drained worker's role switch")
    p.add_argument("--interval-s", type=float, default=2.0, help="the planner's reactive interval")
    p.add_argument("--compare-static", action="store_true",
                   help="also run the static baselines: the best static split (swept) and peak provisioning")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output", default=None, help="folder for results.json and fleet.png")


def _sim_fleet(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tidal.perf.profile import load_profile
    from tidal.sim.fleet_config import FleetConfig
    from tidal.sim.fleet_experiment import ExperimentConfig, compare, table
    from tidal.sim.timing import TimingModel

    try:
        model = load_profile(args.profile) if args.profile else TimingModel()
    except ValueError as exc:
        print(f"tidal sim-fleet: {exc}", file=sys.stderr)
        return 2
    fleet = FleetConfig(startup_s=args.startup_s, flip_s=args.flip_s,
                        **({"token_budget": model.prefill_knee_tokens()} if args.profile else {}))
    extra = {"trace": args.trace} if args.trace else {}
    config = ExperimentConfig(workload=args.workload, max_workers=args.max_workers, duration_s=args.duration_s,
                              ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, calm_s=args.calm_s, burst_s=args.burst_s,
                              interval_s=args.interval_s, seed=args.seed, **extra)
    result = compare(config, fleet, model, with_static=args.compare_static, with_planner=args.planner == "on")
    result["name"] = f"{args.workload}, {args.max_workers} workers"
    print(result["workload"])
    print(table([result]))
    if args.output:
        from tidal.sim.fleet_plots import plot_experiment

        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_experiment(result, out / "fleet.png", f"{result['name']}: {result['workload']}")
        print(f"wrote {out / 'results.json'} and {out / 'fleet.png'}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from tidal.perf.profile import save_profile
    from tidal.perf.report import profile_report
    from tidal.perf.sweep import SweepConfig, SweepError, run_profile

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    given = {"prefill_tokens": args.prefill_tokens, "decode_batches": args.decode_batches,
             "decode_contexts": args.decode_contexts, "seed": args.seed}
    sweep = SweepConfig(**{k: v for k, v in given.items() if v is not None}, warmup=args.warmup,
                        repeats=args.repeats, decode_steps=args.decode_steps)
    try:
        profile = run_profile(engine_config_from_args(args), sweep)
    except (SweepError, ValueError) as exc:
        print(f"tidal profile: {exc}", file=sys.stderr)
        return 1
    save_profile(profile, args.out)
    console = Console()
    for part in profile_report(profile, args.itl_targets_ms):
        console.print(part, markup=False)
    console.print(f"wrote {args.out}")
    return 0


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--workload", default="chat", choices=["chat", "synthetic", "trace"])
    p.add_argument("--trace", default=None, help="trace workload: a Mooncake .jsonl or Azure .csv file")
    p.add_argument("--trace-format", default="auto", choices=["auto", "mooncake", "azure"])
    p.add_argument("--time-scale", type=float, default=1.0, help="trace timestamps x this (2: half speed)")
    p.add_argument("--max-input-len", type=int, default=None, help="trace: cap prompt tokens")
    p.add_argument("--max-output-len", type=int, default=None, help="trace: cap output tokens")
    p.add_argument("--arrival", default="poisson", choices=["constant", "poisson", "gamma", "square", "sine", "ramp"])
    p.add_argument("--rate", type=float, default=1.0, help="sessions (chat) or requests (synthetic) per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape k (CV 1/sqrt(k))")
    p.add_argument("--burst-factor", type=float, default=4.0)
    p.add_argument("--burst-s", type=float, default=10.0)
    p.add_argument("--calm-s", type=float, default=30.0)
    p.add_argument("--amplitude", type=float, default=0.8, help="sine: rate x (1 + A sin(2 pi t / period))")
    p.add_argument("--period-s", type=float, default=60.0, help="sine: period")
    p.add_argument("--end-rate", type=float, default=None, help="ramp: from --rate to this over --ramp-s")
    p.add_argument("--ramp-s", type=float, default=60.0)
    p.add_argument("--requests", type=int, default=100, help="synthetic: requests to send; trace: at most")
    p.add_argument("--sessions", type=int, default=10, help="chat: sessions to run")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--think-s", type=float, default=2.0, help="chat: mean think time between turns")
    p.add_argument("--system-words", type=int, default=200, help="chat: shared system prompt length")
    p.add_argument("--user-words", type=int, default=30)
    p.add_argument("--input-len", type=int, default=256, help="synthetic: prompt tokens")
    p.add_argument("--input-len-range", type=float, default=0.0, help="synthetic: +- fraction, uniform")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=30000, help="synthetic: token ids drawn below this")
    p.add_argument("--slo", default=None, help="e.g. ttft_ms=500,itl_ms=50 (also tpot_ms, e2e_ms)")
    p.add_argument("--output", default=None, help="folder for records.jsonl and summary.json")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests (chat: sessions) in flight; with a high --rate, a closed loop")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--duration-s", type=float, default=None,
                   help="no arrivals after this many seconds (then --requests/--sessions are upper bounds)")
    p.add_argument("--sweep-rates", default=None, help="e.g. 1,2,4: one run per rate; reports the capacity")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the load (chat, synthetic): when one client process nears a "
                        "core, the client, not the server, limits the numbers")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                   help="no load: compare earlier runs' outputs side by side (table, compare.png in --output)")


def _bench(args: argparse.Namespace) -> int:
    from tidal.bench.metrics import parse_slo
    from tidal.bench.runner import BenchConfig
    from tidal.bench.rate_sweep import run_bench, sweep

    if args.compare:
        from tidal.bench.plots import compare

        print(compare(args.compare, args.output or "."))
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        slo = parse_slo(args.slo)
    except ValueError as exc:
        print(f"tidal bench: {exc}", file=sys.stderr)
        return 2
    config = BenchConfig(
        url=args.url, workload=args.workload, model=args.model, arrival=args.arrival, rate=args.rate,
        burstiness=args.burstiness, burst_factor=args.burst_factor, burst_s=args.burst_s, calm_s=args.calm_s,
        amplitude=args.amplitude, period_s=args.period_s, end_rate=args.end_rate, ramp_s=args.ramp_s,
        requests=args.requests, sessions=args.sessions, turns=args.turns, think_s=args.think_s,
        system_words=args.system_words, user_words=args.user_words, input_len=args.input_len,
        input_len_range=args.input_len_range, output_len=args.output_len, vocab_size=args.vocab_size,
        seed=args.seed, timeout_s=args.timeout_s, output=args.output, slo=tuple(slo.items()),
        trace=args.trace, trace_format=args.trace_format, time_scale=args.time_scale,
        max_input_len=args.max_input_len, max_output_len=args.max_output_len, max_concurrency=args.max_concurrency,
        duration_s=args.duration_s)
    if args.processes > 1 and args.workload == "trace":
        print("tidal bench: --processes splits chat and synthetic runs, not a trace", file=sys.stderr)
        return 2
    if args.sweep_rates:
        sweep(config, [float(r) for r in args.sweep_rates.split(",")], processes=args.processes)
    else:
        run_bench(config, args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
