"""`tidal` command line.

    tidal serve [MODEL] [engine flags]    one aggregated worker behind the OpenAI frontend
    tidal serve -f CONFIG.yaml [--host H] [--port P]
                                          a deployment: frontend, router, prefill/decode workers
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

logger = logging.getLogger("tidal")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face folder or dummy:ARCH (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json, or a .gguf file")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB for the KV cache")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--token-budget", type=int, default=256, help="tokens per engine step")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads in the worker")


def deployment_from_args(args: argparse.Namespace):
    """`tidal serve MODEL --flags`: one aggregated worker, as a deployment."""
    from tidal.deploy.config import parse_deployment

    engine = {"dtype": args.dtype, "max_model_len": args.max_model_len, "seed": args.seed,
              "block_size": args.block_size, "num_kv_blocks": args.num_kv_blocks,
              "kv_cache_memory_gib": args.kv_cache_memory, "enable_prefix_caching": not args.no_prefix_caching,
              "token_budget": args.token_budget, "max_num_seqs": args.max_num_seqs,
              "enable_chunked_prefill": not args.no_chunked_prefill}
    return parse_deployment({
        "model": args.model, "tokenizer": args.tokenizer, "served_model_name": args.served_model_name,
        "frontend": {"host": args.host or "127.0.0.1", "port": 8000 if args.port is None else args.port,
                     "max_request_body_bytes": args.max_request_body_bytes, "log_level": args.log_level},
        "engine": {k: v for k, v in engine.items() if v is not None},
        "workers": [{"role": "both", "devices": [args.device], "num_threads": args.num_threads}],
    }, "command line")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API (one worker, or a deployment "
                                         "config with -f)")
    _add_engine_args(serve)
    serve.add_argument("-f", "--config", default=None,
                       help="deployment YAML (frontend, router, workers); the engine flags are then ignored")
    serve.add_argument("--host", default=None, help="frontend address (overrides the config's)")
    serve.add_argument("--port", type=int, default=None, help="frontend port (overrides the config's)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--max-request-body-bytes", type=int, default=8 << 20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        from tidal.deploy.config import DeploymentError, load_deployment
        from tidal.deploy.launcher import serve_deployment

        try:
            if args.config is not None:
                if args.model is not None:
                    parser.error("give a MODEL or -f CONFIG, not both")
                deployment = load_deployment(args.config)
            else:
                deployment = deployment_from_args(args)
        except DeploymentError as exc:
            print(f"tidal serve: {exc}", file=sys.stderr)
            return 2
        logger.info("deployment: %s", deployment.model_dump(exclude_defaults=True))
        try:
            asyncio.run(serve_deployment(deployment, args.host, args.port))
        except KeyboardInterrupt:
            pass
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
