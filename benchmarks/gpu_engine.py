"""The GPU engine against the card's ceilings, in one device call per part.

    python -m benchmarks.gpu_engine --parts ceilings,decode,prefill,server,hf \
        --models llama-3.1-8b,qwen3-8b --tokenizer .gpu_assets/tokenizer
    python -m benchmarks.gpu_engine --parts ceilings,tp --tp-model llama-3.1-70b --tp 2

Parts:
- ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate.
- decode: the runner's decode step (inputs to sampled token ids on the host, CUDA graphs on) at
  batch 1/16/64/256 x context 1k/8k, against (weight bytes read + KV bytes read) / bandwidth.
  The KV cache is filled with random values. A point whose KV does not fit in the cache reuses
  blocks across requests (marked `kv_shared`: its bytes still count, some may come from L2).
- prefill: one prompt of 2k/8k/32k tokens in one step, against 2 x params x tokens / matmul rate
  (params: the decoder layers, which every token passes; also shown with attention's FLOPs).
- server: `tidal serve` on the GPU, `tidal bench` closed loop at concurrency 1/16/64/256, input
  1024 and output 256 tokens (ignore_eos), output tokens/s.
- hf: Hugging Face transformers `generate` (eager, bf16, same shape, random weights) at batch 1
  and 64, same input and output lengths: the naive peer.
- profile: `tidal profile` of the first model (a reduced grid), the step-time file `tidal sim` and
  the per-role tuning read; written beside the results as profile-<model>-<card>.json.
- breakdown: where a decode step's time goes (batch 1 and 64, context 1k): wall time of the step,
  GPU time of the graph replay alone, and the kernels of an eager step by GPU time (torch.profiler).
- tp: the decode and prefill points for a tensor-parallel model (`--tp-model`, `--tp` GPUs).

Results merge into `--out` (default $OUT or benchmarks/results) as gpu_engine-<card>.json, so a
later call adds parts; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tidal import LLM
from tidal.bench.server import ServerProcess, tidal_command
from tidal.runtime.ports import free_port
from tidal.models.arch import get_preset, param_count
from tidal.perf.ceilings import device_ceilings
from tidal.perf.step_timing import decode_batch, step_points, timed_steps

GiB = 1 << 30


def engine_for(preset: str, kv_gib: float, tp: int = 1, max_seqs: int = 256) -> LLM:
    kwargs = {"tensor_parallel_size": tp} if tp > 1 else {}
    return LLM(f"dummy:{preset}", device="cuda", dtype="bfloat16", kv_cache_memory_bytes=int(kv_gib * GiB),
               max_num_seqs=max_seqs, token_budget=32768, max_model_len=40960, **kwargs)


def breakdown(llm: LLM, batches=(1, 64)) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    runner = llm.engine.runner
    rng = np.random.default_rng(1)
    rows = []
    for batch in batches:
        step, _ = decode_batch(batch, 1024, runner.block_size, runner.num_blocks, runner.arch.vocab_size, rng)
        wall = timed_steps(runner.forward, step, 50)
        graphs = runner.graphs
        graphs.run(step)  # inputs into the static buffers once; then the replay alone
        graph = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / 50
        with profile(activities=[ProfilerActivity.CPU]) as host_prof:  # the host's share of a graph step
            for _ in range(20):
                runner.forward(step).argmax(-1).tolist()
        host_ops = sorted(((e.key, e.self_cpu_time_total / 20 / 1e3) for e in host_prof.key_averages()),
                          key=lambda k: -k[1])[:10]
        print(f"breakdown b={batch} host ops (self ms per step): "
              + ", ".join(f"{n[:40]} {t:.3f}" for n, t in host_ops), flush=True)
        runner.graphs = None  # an eager step, to see each kernel
        try:
            timed_steps(runner.forward, step, 3)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner.forward(step).argmax(-1).tolist()
        finally:
            runner.graphs = graphs
        kernels = sorted(((e.key, e.device_time_total / 5 / 1e3, e.count // 5) for e in prof.key_averages()
                          if e.device_time_total > 0), key=lambda k: -k[1])
        total = sum(k[1] for k in kernels)
        rows.append({"batch": batch, "context": 1024, "step_wall_ms": wall * 1e3, "graph_replay_ms": replay_ms,
                     "eager_kernel_ms": total, "eager_kernels_per_step": sum(k[2] for k in kernels),
                     "top_kernels": [{"name": n[:90], "ms": t, "count": c} for n, t, c in kernels[:14]],
                     "graph_step_host_ops": [{"name": n[:60], "self_ms": t} for n, t in host_ops]})
        print(f"breakdown b={batch}: step {wall * 1e3:.2f} ms, graph replay {replay_ms:.2f} ms, "
              f"eager kernels {total:.2f} ms in {sum(k[2] for k in kernels)} launches", flush=True)
        for n, t, c in kernels[:14]:
            print(f"   {t:7.3f} ms  x{c:<4} {n[:90]}")
    return rows


def serve_throughput(preset: str, tokenizer: str, concurrencies, kv_gib: float) -> list[dict]:
    from tidal.bench.rate_sweep import run_bench
    from tidal.bench.runner import BenchConfig

    port = free_port()
    serve = ["serve", f"dummy:{preset}", "--device", "cuda", "--dtype", "bfloat16", "--port", str(port),
             "--kv-cache-memory", str(kv_gib), "--max-num-seqs", "256", "--token-budget", "8192",
             "--max-model-len", "8192", "--tokenizer", tokenizer]
    log = Path(os.environ.get("OUT", "/tmp")) / f"serve-{preset}.log"
    rows = []
    server = ServerProcess(tidal_command(serve), log, port, name="tidal serve", stop_signal=signal.SIGTERM,
                           signal_group=True)
    with server:
        server.start_and_wait(timeout_s=400)
        # Token-id prompts must lie in the served tokenizer's vocabulary (the GPU box's tokenizer may
        # be smaller than the model's); a dummy model's speed does not depend on which ids they are.
        vocab = min(get_preset(preset).vocab_size, _tokenizer_vocab(tokenizer))
        for c in concurrencies:
            config = BenchConfig(url=server.url, workload="synthetic", arrival="constant", rate=1e4,
                                 requests=max(4, 2 * c), input_len=1024, output_len=256, vocab_size=vocab - 100,
                                 max_concurrency=c, seed=c)
            summary = run_bench(config)
            rows.append({"concurrency": c, "output_tokens_per_s": summary["output_tokens_per_s"],
                         "ok": summary["ok"], "requests": summary["requests"],
                         "ttft_ms_p50": summary["ttft_ms"]["p50"], "itl_ms_p50": summary["itl_ms"]["p50"],
                         "itl_ms_p99": summary["itl_ms"]["p99"]})
    return rows


def _tokenizer_vocab(folder: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).get_vocab_size()


def hf_generate(preset: str, batches) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    arch = get_preset(preset)
    common = dict(hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                  num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                  num_key_value_heads=arch.num_kv_heads, vocab_size=arch.vocab_size, rope_theta=arch.rope_theta,
                  max_position_embeddings=4096, rms_norm_eps=arch.rms_norm_eps, head_dim=arch.head_dim)
    if arch.architecture == "qwen3":
        config, cls = Qwen3Config(**common), Qwen3ForCausalLM
    else:
        config, cls = LlamaConfig(**common, rope_scaling=arch.rope_scaling), LlamaForCausalLM
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = cls(config).eval()
    torch.set_default_dtype(torch.float32)
    rows = []
    for batch in batches:
        ids = torch.randint(100, arch.vocab_size - 100, (batch, 1024), device="cuda")
        kwargs = dict(max_new_tokens=256, min_new_tokens=256, do_sample=False, pad_token_id=0)
        model.generate(ids[:, :64], **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        new = (out.shape[1] - ids.shape[1]) * batch
        rows.append({"batch": batch, "seconds": seconds, "output_tokens_per_s": new / seconds})
        print(f"hf generate b={batch}: {new / seconds:.0f} tok/s", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def print_table(results: dict) -> None:
    c = results.get("ceilings", {})
    print(f"\n{results['card']}: copy {c.get('copy_GBps_read_plus_write', 0):.0f} GB/s, "
          f"bf16 matmul {c.get('bf16_matmul_TFLOPs', 0):.0f} TFLOP/s")
    for model, r in results.get("models", {}).items():
        for d in r.get("decode", []):
            print(f"{model} tp{r.get('tp', 1)} decode b={d['batch']:<3} ctx={d['context']:<5} {d['step_ms']:7.2f} ms "
                  f"floor {d['floor_ms']:6.2f}  x{d['x_floor']:.2f}{'  kv_shared' if d['kv_shared'] else ''}")
        for p in r.get("prefill", []):
            print(f"{model} tp{r.get('tp', 1)} prefill {p['tokens']:<6} {p['ms']:8.1f} ms {p['tokens_per_s']:8.0f} tok/s "
                  f"{p['mfu_pct']:4.0f}% of matmul ({p['mfu_with_attention_pct']:.0f}% with attention)")
        for s in r.get("server", []):
            if not s["ok"]:
                print(f"{model} server c={s['concurrency']}: every request failed")
                continue
            print(f"{model} server c={s['concurrency']:<4} {s['output_tokens_per_s']:8.0f} out tok/s "
                  f"ttft p50 {s['ttft_ms_p50']:.0f} ms itl p50 {s['itl_ms_p50']:.1f} p99 {s['itl_ms_p99']:.1f} ms")
        for h in r.get("hf", []):
            print(f"{model} hf generate b={h['batch']:<3} {h['output_tokens_per_s']:8.0f} out tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="ceilings,decode,prefill,server,hf")
    parser.add_argument("--models", default="llama-3.1-8b,qwen3-8b")
    parser.add_argument("--server-models", default="llama-3.1-8b")
    parser.add_argument("--tokenizer", default=".gpu_assets/tokenizer")
    parser.add_argument("--decode-batches", default="1,16,64,256")
    parser.add_argument("--prefill-tokens", default="2048,8192,32768")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--hf-batches", default="1,64")
    parser.add_argument("--kv-gib", type=float, default=None, help="default: most of the free memory")
    parser.add_argument("--tp-model", default="llama-3.1-70b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    card = torch.cuda.get_device_name(0).replace(" ", "-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_engine-{card}.json")
    results = json.load(open(path)) if os.path.exists(path) else {"card": card, "models": {}}
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["ceilings"] = device_ceilings()
    print("ceilings", results["ceilings"], flush=True)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    free_gib = torch.cuda.mem_get_info(0)[0] / GiB
    for preset in args.models.split(",") if parts & {"decode", "prefill"} else []:
        # The rest of the memory after the weights and ~10 GiB for activations of a 32k prefill and graphs.
        kv_gib = args.kv_gib or (free_gib - 2 * param_count(get_preset(preset)) / GiB - 10)
        llm = engine_for(preset, kv_gib)
        entry = results["models"].setdefault(preset, {})
        entry.update(step_points(llm.engine.runner, results["ceilings"],
                                 ints(args.decode_batches) if "decode" in parts else [],
                                 ints(args.prefill_tokens) if "prefill" in parts else []))
        llm.close()
        del llm
        gc.collect()  # the runner and its graphs refer to each other
        torch.cuda.empty_cache()
        json.dump(results, open(path, "w"), indent=1)
    if "breakdown" in parts:
        preset = args.models.split(",")[0]
        llm = engine_for(preset, 20.0)
        results["models"].setdefault(preset, {})["breakdown"] = breakdown(llm)
        json.dump(results, open(path, "w"), indent=1)
        llm.close()
        del llm
        gc.collect()  # the runner and its graphs refer to each other
        torch.cuda.empty_cache()
    for preset in args.server_models.split(",") if "server" in parts else []:
        rows = serve_throughput(preset, args.tokenizer, ints(args.concurrency), kv_gib=min(40.0, free_gib - 30))
        results["models"].setdefault(preset, {})["server"] = rows
        json.dump(results, open(path, "w"), indent=1)
    for preset in args.server_models.split(",") if "hf" in parts else []:
        results["models"].setdefault(preset, {})["hf"] = hf_generate(preset, ints(args.hf_batches))
        json.dump(results, open(path, "w"), indent=1)
    if "profile" in parts:
        preset = args.models.split(",")[0]
        target = os.path.join(args.out, f"profile-{preset}-{card}.json")
        subprocess.run([sys.executable, "-m", "tidal.cli", "profile", "--model", f"dummy:{preset}", "--device", "cuda",
                        "--dtype", "bfloat16", "--kv-cache-memory", str(min(60.0, free_gib - 30)),
                        "--max-model-len", "16384", "--prefill-tokens", "256,512,1024,2048,4096,8192,16384",
                        "--decode-batches", "1,8,32,64,128,256", "--decode-contexts", "1024,4096",
                        "--out", target], check=True, timeout=400)
        results["models"].setdefault(preset, {})["profile_file"] = os.path.basename(target)
        json.dump(results, open(path, "w"), indent=1)
    if "tp" in parts:
        llm = engine_for(args.tp_model, kv_gib=8.0, tp=args.tp, max_seqs=64)
        key = f"{args.tp_model}-tp{args.tp}"
        results["models"][key] = step_points(llm.engine.runner, results["ceilings"], [1, 16, 64], [2048, 8192],
                                             tp=args.tp)
        llm.close()
        json.dump(results, open(path, "w"), indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
