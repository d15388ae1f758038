"""`tidal profile`: a real sweep on the CPU, the profile's arithmetic on hand-made grids, its file
format, `tidal sim --profile`, and the per-role defaults a deployment takes from a profile."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import httpx
import pytest

from _server import REPO_ROOT, running_server
from tidal.cli import main
from tidal.deploy.engine_knobs import RoleLimits, resolve_role_limits
from tidal.deploy.config import DeploymentError, parse_deployment
from tidal.perf.profile import (DecodePoint, PrefillPoint, Profile, ProfileError, SkippedPoint, load_profile,
                                save_profile)

# Prefill: 100 tokens in 10 ms (10k tokens/s), 200 in 12 ms (16.7k/s), 400 in 20 ms (20k/s), 800 in
# 40 ms (20k/s). Decode at context 1000: 10 ms for one sequence + 2 ms per extra one; at context 2000:
# 12 ms + 4 ms per extra one; batch 8 measured at context 1000 only (30 ms).
PREFILL = [(100, 0.010), (200, 0.012), (400, 0.020), (800, 0.040)]
DECODE = [(1, 1000, 0.010), (4, 1000, 0.016), (1, 2000, 0.012), (4, 2000, 0.024), (8, 1000, 0.030)]


def make_profile(prefill=PREFILL, decode=DECODE) -> Profile:
    return Profile(model="dummy:test", device="cpu", device_name="test", dtype="float32", block_size=16,
                   num_kv_blocks=1000, created="2026-11-27T00:00:00+00:00", tidal_version="0.1.0",
                   prefill=tuple(PrefillPoint(tokens=t, step_s=s) for t, s in prefill),
                   decode=tuple(DecodePoint(batch=b, context_len=c, step_s=s) for b, c, s in decode),
                   skipped=(SkippedPoint("decode", "needs more KV blocks", batch=8, context_len=2000),))


@pytest.fixture
def profile_path(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(make_profile(), path)
    return str(path)


# ---- a real sweep ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_sweeps_tiny_llama_on_cpu_and_writes_a_profile(tmp_path):
    out = tmp_path / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tidal.cli", "profile", "--model", "dummy:tiny-llama", "--num-kv-blocks", "32",
         "--num-threads", "1", "--prefill-tokens", "32,64", "--decode-batches", "1,2,8",
         "--decode-contexts", "32,64", "--repeats", "1", "--decode-steps", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = load_profile(out)
    assert (profile.model, profile.device, profile.dtype, profile.block_size) == ("dummy:tiny-llama", "cpu",
                                                                                  "float32", 16)
    assert [p.tokens for p in profile.prefill] == [32, 64]
    # 8 sequences of 64 tokens (+16 generated over the prefill and the steps) need 8 x 5 blocks > 32
    assert [(p.batch, p.context_len) for p in profile.decode] == [(1, 32), (1, 64), (2, 32), (2, 64), (8, 32)]
    assert [(s.kind, s.batch, s.context_len) for s in profile.skipped] == [("decode", 8, 64)]
    assert "40 KV blocks" in profile.skipped[0].reason
    assert all(p.step_s > 0 for p in profile.prefill + profile.decode)
    assert "knee" in proc.stdout and f"wrote {out}" in proc.stdout


# ---- arithmetic ------------------------------------------------------------------------------------
def test_prefill_interpolates_and_extrapolates_linearly():
    p = make_profile()
    assert p.prefill_s(200) == pytest.approx(0.012)
    assert p.prefill_s(300) == pytest.approx(0.016)  # halfway between 12 and 20 ms
    assert p.prefill_s(1600) == pytest.approx(0.080)  # last slope, 20 ms / 400 tokens, 800 tokens on
    assert p.prefill_s(50) == pytest.approx(0.009)  # first slope, 2 ms / 100 tokens, 50 tokens back
    assert p.prefill_s(0) == 0.0


def test_decode_is_bilinear_on_a_ragged_grid():
    p = make_profile()
    assert p.decode_s(4, 2000) == pytest.approx(0.024)
    assert p.decode_s(8, 1000) == pytest.approx(0.030)  # measured
    assert p.decode_s(2, 1000) == pytest.approx(0.012)  # 10 ms + 2 ms
    assert p.decode_s(2, 1500) == pytest.approx(0.014)  # halfway between 12 (ctx 1000) and 16 ms (ctx 2000)
    # ctx 2000 has no batch 8: its line (12 ms + 4 ms a sequence) gives 40 ms; ctx 1500: halfway to 30 ms
    assert p.decode_s(8, 2000) == pytest.approx(0.040)
    assert p.decode_s(8, 1500) == pytest.approx(0.035)
    # past both edges: batch 4 at ctx 3000 continues 16 -> 24 ms per 1000 tokens, to 32 ms
    assert p.decode_s(4, 3000) == pytest.approx(0.032)


def test_mixed_step_adds_the_prefill_tokens_marginal_cost():
    p = make_profile()
    assert p.step_s(300, 0, 0) == pytest.approx(0.016)
    assert p.step_s(0, 4, 8000) == pytest.approx(0.024)  # 4 sequences, 2000 tokens each
    # decode 24 ms + prefill_s(200) - prefill_s(4) = 24 + 12 - (10 - 96 x 0.02) = 24 + 3.92 ms
    assert p.step_s(196, 4, 8000) == pytest.approx(0.02792)


def test_knee_is_the_smallest_batch_near_the_best_throughput():
    p = make_profile()
    assert p.prefill_knee_tokens() == 400  # 20k tokens/s; 200 tokens reach 16.7k, under 0.9 x 20k
    assert p.prefill_knee_tokens(0.8) == 200  # 16.7k >= 16k
    with pytest.raises(ValueError, match="threshold"):
        p.prefill_knee_tokens(0)


def test_max_decode_batch_keeps_every_batch_up_to_it_within_the_target():
    p = make_profile()
    # ctx 1000: 10, 12, 14, 16 ms for batches 1-4, then +14/4 = 3.5 ms a sequence up to 30 ms at 8
    assert p.max_decode_batch(14, 1000) == 3
    assert p.max_decode_batch(23, 1000) == 6  # 16 + 2 x 3.5 = 23 ms
    assert p.max_decode_batch(1000, 1000) == 8  # never past the largest measured batch
    assert p.max_decode_batch(20, 2000) == 3  # 12, 16, 20, 24 ms
    with pytest.raises(ValueError, match="even one sequence takes 10.00 ms"):
        p.max_decode_batch(9, 1000)


# ---- files -----------------------------------------------------------------------------------------
def test_a_saved_profile_loads_back_equal(profile_path):
    assert load_profile(profile_path) == make_profile()
    data = json.loads(open(profile_path).read())
    assert data["schema_version"] == 1 and data["prefill"][0] == {"tokens": 100, "step_s": 0.01, "num_prompts": 1}


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "not a JSON profile"),
    (lambda d: [d], "expected a JSON object"),
    (lambda d: {**d, "schema_version": 2}, "schema_version 2; this tidal reads version 1"),
    (lambda d: {k: v for k, v in d.items() if k != "model"}, "missing required field `model`"),
    (lambda d: {**d, "prefill": [{"tokens": "100", "step_s": 0.01}]}, "at `$.prefill[0].tokens`"),
    (lambda d: {**d, "prefill": [{"tokens": 100, "step_s": -1}]}, "bad prefill point"),
    (lambda d: {**d, "decode": []}, "at least one measured prefill point and one decode point"),
    (lambda d: {**d, "decode": d["decode"][:1] * 2}, "same batch and context_len"),
])
def test_bad_files_are_refused_with_the_reason(profile_path, edit, message):
    edited = edit(json.loads(open(profile_path).read()))
    with open(profile_path, "w") as f:
        f.write(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ProfileError, match=re.escape(message)) as err:
        load_profile(profile_path)
    assert str(err.value).startswith(profile_path)


def test_a_missing_file_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot read the profile"):
        load_profile(tmp_path / "nope.json")


# ---- tidal sim --profile ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sim_runs_on_a_profile(tmp_path, profile_path):
    with running_server(["--workers", "2", "--profile", profile_path, "--speedup", "10"], tmp_path / "sim.log",
                        command="sim") as url:
        reply = httpx.post(url + "/v1/completions", json={"model": "sim", "prompt": "hello there",
                                                          "max_tokens": 4}, timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert "profile of dummy:test on test" in (tmp_path / "sim.log").read_text()


def test_sim_takes_a_profile_or_a_timing_not_both(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["sim", "--timing", "base_s=0.01", "--profile", "p.json"])
    assert err.value.code == 2
    assert main(["sim", "--profile", str(tmp_path / "nope.json")]) == 2
    assert "cannot read the profile" in capsys.readouterr().err


# ---- per-role tuning -------------------------------------------------------------------------------
def test_role_limits_come_from_the_profile_unless_set(profile_path):
    e = {"profile": profile_path, "itl_target_ms": 20}
    prefill = resolve_role_limits("prefill", e)
    assert (prefill.token_budget, prefill.max_num_seqs) == (400, 128)  # the knee; the default cap
    assert "prefill knee" in prefill.derived
    # decode at the default context 2048: 2.4% past ctx 2000 along each batch's line,
    # so 12.1, 16.2, 20.3 ms for batches 1-3: batch 2 is the last within 20 ms
    decode = resolve_role_limits("decode", e)
    assert (decode.token_budget, decode.max_num_seqs) == (256, 2)
    # at ctx 1000: 16 ms at batch 4, 19.5 ms at 5, 23 ms at 6
    assert resolve_role_limits("decode", {**e, "tuning_context_len": 1000}).max_num_seqs == 5
    assert resolve_role_limits("both", e) == RoleLimits(256, 128)
    explicit = {**e, "token_budget": 1000, "max_num_seqs": 64}
    for role in ("prefill", "decode"):
        assert resolve_role_limits(role, explicit) == RoleLimits(1000, 64)
    with pytest.raises(ValueError, match="needs engine.itl_target_ms"):
        resolve_role_limits("decode", {"profile": profile_path})


def test_a_deployment_tunes_each_role_and_logs_it_once(profile_path, caplog):
    d = parse_deployment({"engine": {"profile": profile_path, "itl_target_ms": 20},
                          "workers": [{"role": "prefill", "count": 2}, {"role": "decode"}, {"role": "both"},
                                      {"role": "prefill", "engine": {"token_budget": 512}}]})
    with caplog.at_level(logging.INFO, logger="tidal.deploy.engine_knobs"):
        configs = [(worker_id, d.engine_config(section, device).scheduler) for worker_id, section, device in
                   d.replicas()]
    limits = {worker_id: (s.token_budget, s.max_num_seqs) for worker_id, s in configs}
    assert limits == {"prefill-0": (400, 128), "prefill-1": (400, 128), "decode-0": (256, 2),
                      "both-0": (256, 128), "prefill-2": (512, 128)}
    logged = [r.getMessage() for r in caplog.records]
    assert sum("token_budget=400" in m for m in logged) == 1 and sum("max_num_seqs=2" in m for m in logged) == 1


@pytest.mark.parametrize("engine, message", [
    ({"profile": "PROFILE"}, "workers.1 (decode): a decode worker tuned from a profile"),
    ({"profile": "PROFILE", "itl_target_ms": 5}, "even one sequence takes"),
    ({"profile": "missing.json", "itl_target_ms": 20}, "workers.0 (prefill): missing.json: cannot read"),
    ({"itl_target_ms": 0}, "engine.itl_target_ms"),
    ({"tuning_context_len": -1}, "engine.tuning_context_len"),
    ({"itl_target": 20}, "engine.itl_target"),
])
def test_bad_tuning_settings_are_refused(profile_path, engine, message):
    engine = {k: profile_path if v == "PROFILE" else v for k, v in engine.items()}
    with pytest.raises(DeploymentError, match=re.escape(message)):
        parse_deployment({"engine": engine, "workers": [{"role": "prefill"}, {"role": "decode"}]}, "my.yaml")
