"""A performance profile: measured engine step times of one model on one device, and their arithmetic.

`tidal profile` (see `sweep.py`) measures two grids on a real engine:

- prefill: the time of one step that prefills `tokens` prompt tokens (one prompt, or a few equal
  ones when `tokens` exceeds the model's context), nothing else in the batch;
- decode: the time of one step that decodes `batch` sequences whose contexts hold `context_len`
  tokens each.

A `Profile` holds those points plus where they came from (model, device, dtype, block size, date,
tidal version), and answers: `prefill_s(tokens)`, `decode_s(batch, context_len)`, `step_s(...)` for
a mixed step (the simulator's step-time model), `prefill_knee_tokens()` and `max_decode_batch()`
(the per-role defaults of `tuning.py`). It is a frozen value; files are JSON with a
`schema_version`, written by `save_profile` and read back, validated, by `load_profile`.

Pure Python: no torch, no engine imports, so the simulator and the planner can read profiles.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import msgspec

PROFILE_SCHEMA_VERSION = 1
DEFAULT_KNEE_THRESHOLD = 0.9


class ProfileError(ValueError):
    """A profile file that can't be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class PrefillPoint:
    tokens: int
    """Prompt tokens the step prefilled."""
    step_s: float
    """Median time of that step."""
    num_prompts: int = 1
    """Prompts they were split into (more than one only past the model's context length)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    """Sequences decoded in the step (one token each)."""
    context_len: int
    """Tokens already in each sequence's context (its prompt length)."""
    step_s: float
    """Median time of that step."""


@dataclass(frozen=True)
class SkippedPoint:
    """A grid point that was not measured, and why (usually: its KV does not fit in the cache)."""

    kind: str
    """`prefill` or `decode`."""
    reason: str
    tokens: int | None = None
    batch: int | None = None
    context_len: int | None = None


@dataclass(frozen=True, kw_only=True)
class Profile:
    schema_version: int = PROFILE_SCHEMA_VERSION
    """The file format's version; `load_profile` refuses others."""
    model: str
    """The model as given to the engine (`dummy:llama-3.1-8b`, a path, ...)."""
    device: str
    """The torch device it ran on (`cuda:0`, `cpu`)."""
    device_name: str
    """What that device is (`NVIDIA H100 80GB HBM3`, `cpu (x86_64, torch threads=2)`)."""
    dtype: str
    block_size: int
    num_kv_blocks: int
    """KV blocks in the cache during the sweep (bounds which points fit)."""
    created: str
    """When the sweep ran, ISO 8601 (UTC)."""
    tidal_version: str
    prefill: tuple[PrefillPoint, ...]
    decode: tuple[DecodePoint, ...]
    skipped: tuple[SkippedPoint, ...] = ()

    def __post_init__(self) -> None:
        # Points are kept sorted (prefill by tokens, decode by batch then context) and checked once here.
        object.__setattr__(self, "prefill", tuple(sorted(self.prefill, key=lambda p: p.tokens)))
        object.__setattr__(self, "decode", tuple(sorted(self.decode, key=lambda p: (p.batch, p.context_len))))
        object.__setattr__(self, "skipped", tuple(self.skipped))
        _check_points(self)

    def __str__(self) -> str:
        return (f"profile of {self.model} on {self.device_name}: {self.dtype}, {len(self.prefill)} prefill "
                f"and {len(self.decode)} decode points, {self.created[:10]}")

    # ---- step times ----------------------------------------------------------------------------
    def prefill_s(self, tokens: float) -> float:
        """Seconds for a step that prefills `tokens` tokens: piecewise linear between measured points,
        extended linearly (by the nearest segment's slope) beyond them; 0 for no tokens."""
        if tokens <= 0:
            return 0.0
        xs = [p.tokens for p in self.prefill]
        return max(0.0, _interp(xs, [p.step_s for p in self.prefill], tokens))

    def decode_s(self, batch: float, context_len: float) -> float:
        """Seconds for a step that decodes `batch` sequences of `context_len` tokens each: bilinear
        between grid points (linear in batch within each measured context, then linear in context),
        extended linearly beyond the grid in either direction.

        Points skipped during the sweep (large batch x long context) leave a ragged grid: each
        context interpolates over the batches it has, and a context with a single batch is left
        out unless every context has one."""
        columns: dict[int, tuple[list[int], list[float]]] = {}
        for p in self.decode:  # sorted by batch, so each column's batches are too
            xs, ys = columns.setdefault(p.context_len, ([], []))
            xs.append(p.batch)
            ys.append(p.step_s)
        usable = {c: column for c, column in columns.items() if len(column[0]) >= 2} or columns
        contexts = sorted(usable)
        at_batch = [_interp(*usable[c], batch) for c in contexts]
        return max(0.0, _interp(contexts, at_batch, context_len))

    def step_s(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        """Seconds for a mixed step (the simulator's step-time model).

        step_s = decode_s(decode_seqs, decode_context_tokens / decode_seqs)
               + prefill_s(prefill_tokens + decode_seqs) - prefill_s(decode_seqs)

        The decode part reads the weights and every sequence's KV once; the prefill tokens add what
        they add to a batch that already holds `decode_seqs` rows (the matmuls see all rows
        together), so the weights are not counted twice. The second term is floored at 0."""
        if decode_seqs <= 0:
            return self.prefill_s(prefill_tokens)
        decode = self.decode_s(decode_seqs, decode_context_tokens / decode_seqs)
        if prefill_tokens <= 0:
            return decode
        extra = self.prefill_s(prefill_tokens + decode_seqs) - self.prefill_s(decode_seqs)
        return decode + max(0.0, extra)

    # ---- per-role figures ----------------------------------------------------------------------
    def prefill_knee_tokens(self, threshold: float = DEFAULT_KNEE_THRESHOLD) -> int:
        """The smallest measured token count whose prefill throughput (tokens/s) reaches `threshold`
        x the best measured: a bigger batch barely adds throughput but makes every prompt in it wait
        longer, so this budget saturates the device at the least TTFT."""
        if not 0 < threshold <= 1:
            raise ValueError(f"the knee threshold must lie in (0, 1], not {threshold}")
        best = max(p.tokens_per_s for p in self.prefill)
        return next(p.tokens for p in self.prefill if p.tokens_per_s >= threshold * best)

    def max_decode_batch(self, itl_target_ms: float, context_len: int) -> int:
        """The largest batch B such that every batch up to B decodes a step within `itl_target_ms`
        at `context_len` tokens of context (a decode step gives each sequence one token, so its time
        is the ITL). Never above the largest measured batch: past it the profile knows nothing.
        Raises ValueError when even one sequence misses the target."""
        target_s = itl_target_ms / 1000
        one_s = self.decode_s(1, context_len)
        if one_s > target_s:
            raise ValueError(f"{self.model} on {self.device_name}: even one sequence takes {one_s * 1000:.2f} ms "
                             f"a decode step at context {context_len}, over the ITL target of {itl_target_ms:g} ms")
        cap = max(p.batch for p in self.decode)
        batch = 1
        while batch < cap and self.decode_s(batch + 1, context_len) <= target_s:
            batch += 1
        return batch


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x) through sorted, distinct xs; beyond the ends, the end segment's line.
    One point: a constant."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _check_points(profile: Profile) -> None:
    if profile.schema_version != PROFILE_SCHEMA_VERSION:
        raise ValueError(f"schema_version {profile.schema_version}; this tidal reads {PROFILE_SCHEMA_VERSION}")
    if not profile.prefill or not profile.decode:
        raise ValueError("a profile needs at least one measured prefill point and one decode point")
    if profile.block_size < 1 or profile.num_kv_blocks < 1:
        raise ValueError("block_size and num_kv_blocks must be positive")
    for p in profile.prefill:
        if p.tokens < 1 or p.num_prompts < 1 or not _positive(p.step_s):
            raise ValueError(f"bad prefill point {p}: tokens and num_prompts >= 1, step_s > 0")
    for p in profile.decode:
        if p.batch < 1 or p.context_len < 1 or not _positive(p.step_s):
            raise ValueError(f"bad decode point {p}: batch and context_len >= 1, step_s > 0")
    if len({p.tokens for p in profile.prefill}) != len(profile.prefill):
        raise ValueError("two prefill points have the same token count")
    if len({(p.batch, p.context_len) for p in profile.decode}) != len(profile.decode):
        raise ValueError("two decode points have the same batch and context_len")


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


# ---- files ------------------------------------------------------------------------------------
def profile_to_json(profile: Profile) -> bytes:
    return msgspec.json.format(msgspec.json.encode(profile), indent=2) + b"\n"


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_bytes(profile_to_json(profile))


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file; any problem is a ProfileError naming the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile: {exc.strerror}") from None
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProfileError(f"{path}: not a JSON profile: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != PROFILE_SCHEMA_VERSION:
        raise ProfileError(f"{path}: profile schema_version {version!r}; this tidal reads version "
                           f"{PROFILE_SCHEMA_VERSION} (re-run `tidal profile`)")
    try:
        return msgspec.convert(data, Profile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"{path}: invalid profile: {exc}") from None
