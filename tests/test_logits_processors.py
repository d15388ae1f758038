"""Penalties and logit_bias (tidal/engine/logits_processors.py) against a plain per-token torch
reference, and in the engine: a bias that bans the greedy token changes the output, a frequency
penalty breaks a repetitive greedy output, seeded outputs stay reproducible."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from tidal.engine.logits_processors import LogitsAdjustment, adjust_logits, check_params
from tidal.protocol import SamplingParams

VOCAB = 97


@dataclass
class Row:
    """What `adjust_logits` reads of an engine request."""

    params: SamplingParams
    prompt: list[int]
    output: list[int]
    num_resumed_tokens: int = 0
    all_token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    logits_adjustment: LogitsAdjustment | None = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt + self.output
        self.num_prompt_tokens = len(self.prompt)
        self.logits_adjustment = LogitsAdjustment.of(self.params)


def reference(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """One row, token by token, as OpenAI and vLLM describe it."""
    x = logits.clone()
    p = row.params
    cut = row.num_prompt_tokens - row.num_resumed_tokens
    output = row.all_token_ids[cut:]
    for token_id, bias in p.logit_bias:
        x[token_id] += bias
    if p.repetition_penalty != 1.0:
        for token_id in set(row.all_token_ids):
            x[token_id] = x[token_id] / p.repetition_penalty if x[token_id] > 0 else x[token_id] * p.repetition_penalty
    for token_id in set(output):
        x[token_id] -= p.frequency_penalty * output.count(token_id) + p.presence_penalty
    return x


def random_params(rng: random.Random) -> SamplingParams:
    kinds = rng.sample(["presence", "frequency", "repetition", "bias"], rng.randint(0, 4))
    bias = tuple((rng.randrange(VOCAB), rng.uniform(-100, 100)) for _ in range(rng.randint(1, 5)))
    return SamplingParams(presence_penalty=rng.uniform(-2, 2) if "presence" in kinds else 0.0,
                          frequency_penalty=rng.uniform(-2, 2) if "frequency" in kinds else 0.0,
                          repetition_penalty=rng.uniform(0.5, 2.0) if "repetition" in kinds else 1.0,
                          logit_bias=bias if "bias" in kinds else ())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(12))
def test_batch_matches_the_per_token_reference(seed, device):
    rng = random.Random(seed)
    rows = [Row(random_params(rng), [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))],
                [rng.randrange(8) for _ in range(rng.randint(0, 40))]) for _ in range(rng.randint(1, 9))]
    torch.manual_seed(seed)
    logits = torch.randn(len(rows), VOCAB) * 5
    expected = torch.stack([reference(logits[i], row) for i, row in enumerate(rows)])
    got = adjust_logits(logits.clone().to(device), rows)
    torch.testing.assert_close(got.cpu(), expected)


def test_rows_that_ask_nothing_are_left_bit_for_bit():
    rows = [Row(SamplingParams(), [1, 2], [3, 3]), Row(SamplingParams(frequency_penalty=1.0), [1], [3, 3, 4]),
            Row(SamplingParams(), [5], [])]
    logits = torch.randn(3, VOCAB)
    got = adjust_logits(logits.clone(), rows)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])
    assert got[1, 3] == logits[1, 3] - 2.0 and got[1, 4] == logits[1, 4] - 1.0
    plain = [Row(SamplingParams(), [1], [2])] * 4
    same = logits.clone()
    assert adjust_logits(same, plain[:3]) is same and torch.equal(same, logits)


def test_each_field_alone():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])

    def one(output, prompt=(3,), **params):
        return adjust_logits(logits.clone(), [Row(SamplingParams(**params), list(prompt), list(output))])[0].tolist()

    assert one([0, 0, 1], presence_penalty=0.5) == [1.5, -2.5, 1.0, 0.5]  # once per token present
    assert one([0, 0, 1], frequency_penalty=0.5) == [1.0, -2.5, 1.0, 0.5]  # per occurrence
    assert one([0, 1], repetition_penalty=2.0) == [1.0, -4.0, 1.0, 0.25]  # the prompt's token 3 too
    assert one([], logit_bias=((2, -100.0), (1, 3.0))) == [2.0, 1.0, -99.0, 0.5]
    # a migrated request: the prompt's last token was its own output elsewhere
    row = Row(SamplingParams(frequency_penalty=1.0), [3, 0], [0], num_resumed_tokens=1)
    assert adjust_logits(logits.clone(), [row])[0].tolist() == [0.0, -2.0, 1.0, 0.5]


def test_narrowed_logits_skip_ids_past_their_width():
    """A dummy model's logits are cut to its tokenizer's size; ids past it are not sampled anyway."""
    rows = [Row(SamplingParams(frequency_penalty=1.0, logit_bias=((50, 5.0), (1, 1.0))), [60], [70, 1])]
    wide = torch.zeros(1, 100)
    got = adjust_logits(wide[:, :40], rows)
    assert got.shape == (1, 40) and got[0, 1] == 0.0 and float(got.abs().sum()) == 0.0  # +1 bias -1 penalty


def test_check_params_names_what_is_out_of_range():
    assert check_params(SamplingParams(presence_penalty=2.0, repetition_penalty=1.3,
                                       logit_bias=((0, -100.0),)), 10) is None
    assert "presence_penalty" in check_params(SamplingParams(presence_penalty=2.5), 10)
    assert "frequency_penalty" in check_params(SamplingParams(frequency_penalty=-3), 10)
    assert "repetition_penalty" in check_params(SamplingParams(repetition_penalty=0.0), 10)
    assert "vocabulary" in check_params(SamplingParams(logit_bias=((10, 1.0),)), 10)
    assert "logit_bias" in check_params(SamplingParams(logit_bias=((1, 101.0),)), 10)


# ---- in the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    from tidal import LLM

    return LLM(dtype="float32", num_kv_blocks=128)


def _greedy(llm, prompt, **params):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, **params)
    return llm.generate(prompt, params)[0].outputs[0].token_ids


def test_engine_logit_bias_bans_the_greedy_token(llm):
    plain = _greedy(llm, "The capital of France is")
    banned = _greedy(llm, "The capital of France is", logit_bias=((plain[0], -100.0),))
    assert banned[0] != plain[0]
    forced = _greedy(llm, "The capital of France is", logit_bias=((42, 100.0),))
    assert forced == [42] * 6


def test_engine_frequency_penalty_breaks_a_repetition(llm):
    prompt = "Repeat after me: la la la la la la"
    plain = _greedy(llm, prompt)
    assert len(set(plain)) <= 2, llm.tokenizer.decode(plain)  # " la" over and over
    penalized = _greedy(llm, prompt, frequency_penalty=2.0)
    assert len(set(penalized)) > len(set(plain)), llm.tokenizer.decode(penalized)
    assert _greedy(llm, prompt, repetition_penalty=3.0) != plain


def test_engine_mixed_batch_leaves_plain_rows_alone(llm):
    """A penalized request beside a plain one: the plain one's tokens are what it gets alone, and a seeded
    penalized one reproduces."""
    prompt = "Repeat after me: la la la la la la"
    alone = _greedy(llm, prompt)
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, presence_penalty=1.5,
                             logit_bias=((alone[0], -5.0),))]
    first = llm.generate([prompt, prompt], params)
    second = llm.generate([prompt, prompt], params)
    assert first[0].outputs[0].token_ids == alone
    assert first[1].outputs[0].token_ids == second[1].outputs[0].token_ids


def test_engine_refuses_out_of_range_values(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        _greedy(llm, "x", logit_bias=((llm.engine.vocab_size, 1.0),))
    with pytest.raises(ValueError, match="repetition_penalty"):
        _greedy(llm, "x", repetition_penalty=0.0)
    assert llm.engine.kv.num_used_blocks == 0
