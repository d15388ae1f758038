"""`tidal` command line: `tidal serve [MODEL] ...` (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tidal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig

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


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=args.model, tokenizer=args.tokenizer, served_model_name=args.served_model_name,
                          dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, seed=args.seed),
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_kv_blocks,
                          kv_cache_memory_bytes=int(args.kv_cache_memory * (1 << 30)),
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(token_budget=args.token_budget, max_num_seqs=args.max_num_seqs,
                                  enable_chunked_prefill=not args.no_chunked_prefill))


async def _serve(engine_config: EngineConfig, server_config: ServerConfig, num_threads: int | None) -> None:
    from tidal.frontend.app import build_app, serve_http
    from tidal.tokenizer import load_tokenizer
    from tidal.worker.client import WorkerClient

    tokenizer = load_tokenizer(engine_config.model.model, engine_config.model.tokenizer)
    client = WorkerClient(engine_config, num_threads=num_threads, log_level=server_config.log_level.upper())
    try:
        await client.start()
        logger.info("serving %s on http://%s:%d", client.model_name, server_config.host, server_config.port)
        app = build_app(client, tokenizer, client.model_name, server_config)
        await serve_http(app, server_config)
    finally:
        await client.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--max-request-body-bytes", type=int, default=8 << 20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        engine_config = engine_config_from_args(args)
        server_config = ServerConfig(host=args.host, port=args.port, log_level=args.log_level,
                                     max_request_body_bytes=args.max_request_body_bytes)
        logger.info("config: %s %s", engine_config, server_config)
        try:
            asyncio.run(_serve(engine_config, server_config, args.num_threads))
        except KeyboardInterrupt:
            pass
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
