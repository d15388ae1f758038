"""Tables of a profile for the terminal (`tidal profile` prints them after a sweep)."""

from __future__ import annotations

from rich.table import Table

from tidal.perf.profile import DEFAULT_KNEE_THRESHOLD, Profile


def profile_report(profile: Profile, itl_targets_ms: tuple[float, ...] = (20.0, 50.0, 100.0)) -> list[Table | str]:
    """What to print, in order: a title line, then each table followed by a line saying how to read it."""
    knee = profile.prefill_knee_tokens()
    best = max(p.tokens_per_s for p in profile.prefill)
    return [str(profile),
            prefill_table(profile, knee),
            f"knee: {knee} tokens, the smallest step at >= {DEFAULT_KNEE_THRESHOLD:.0%} of the best {best:,.0f} "
            f"tokens/s (a prefill worker's default token_budget)",
            decode_table(profile),
            f"-: not measured; {len(profile.skipped)} points skipped in all (the file's `skipped` says why)",
            max_batch_table(profile, itl_targets_ms),
            "the largest decode batch within each ITL target (a decode worker's default max_num_seqs); "
            "-: even one sequence is slower"]


def prefill_table(profile: Profile, knee: int) -> Table:
    table = Table(title="prefill")
    for column in ("tokens", "prompts", "step ms", "tokens/s", ""):
        table.add_column(column, justify="right")
    for p in profile.prefill:
        table.add_row(str(p.tokens), str(p.num_prompts), f"{p.step_s * 1000:.2f}", f"{p.tokens_per_s:,.0f}",
                      "<- knee" if p.tokens == knee else "")
    for s in profile.skipped:
        if s.kind == "prefill":
            table.add_row(str(s.tokens), "", "skipped", "", s.reason)
    return table


def decode_table(profile: Profile) -> Table:
    contexts = sorted({p.context_len for p in profile.decode})
    times = {(p.batch, p.context_len): p.step_s for p in profile.decode}
    table = Table(title="decode step ms")
    table.add_column("batch \\ context", justify="right")
    for context_len in contexts:
        table.add_column(str(context_len), justify="right")
    for batch in sorted({p.batch for p in profile.decode} | {s.batch for s in profile.skipped if s.batch}):
        cells = [f"{times[batch, c] * 1000:.2f}" if (batch, c) in times else "-" for c in contexts]
        table.add_row(str(batch), *cells)
    return table


def max_batch_table(profile: Profile, itl_targets_ms: tuple[float, ...]) -> Table:
    contexts = sorted({p.context_len for p in profile.decode})
    table = Table(title="max decode batch")
    table.add_column("ITL ms \\ context", justify="right")
    for context_len in contexts:
        table.add_column(str(context_len), justify="right")
    for target_ms in itl_targets_ms:
        table.add_row(f"{target_ms:g}", *(_max_batch(profile, target_ms, c) for c in contexts))
    return table


def _max_batch(profile: Profile, itl_target_ms: float, context_len: int) -> str:
    try:
        return str(profile.max_decode_batch(itl_target_ms, context_len))
    except ValueError:
        return "-"
