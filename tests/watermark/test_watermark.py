"""The watermark's green test, the sampler's bias step, the z-score and the config: no model."""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest
import torch

from tokenmill.config import EngineConfig, WatermarkConfig
from tokenmill.protocol import SamplingParams
from tokenmill.runner.sampler import Sampler, SamplingRow, column_counters
from tokenmill.runner.watermark import WatermarkBias, green_mask
from tokenmill.watermark import (
    effective_gamma,
    green_bits,
    green_threshold,
    is_green,
    prev_key,
    score_tokens,
    z_score,
)

V = 49152  # SmolLM2's vocabulary


def torch_mask(prev: int, gamma: float, vocab: int = V) -> torch.Tensor:
    keys = torch.tensor([prev_key(prev)], dtype=torch.int64)
    return green_mask(keys, column_counters(vocab), green_threshold(gamma))[0]


# ---------------------------------------------------------------------------- green function


@pytest.mark.parametrize("prev", [0, 1, 2, 17, 4000, V - 1, 2**31 - 1])
def test_torch_mask_equals_pure_python(prev: int) -> None:
    """The runner's vectorized mask and the detector's scalar test agree on every id."""
    t = green_threshold(0.5)
    ref = torch.tensor([green_bits(prev, v) < t for v in range(V)])
    assert torch.equal(torch_mask(prev, 0.5), ref)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_green_fraction_is_gamma(gamma: float) -> None:
    sd = math.sqrt(gamma * (1 - gamma) / V)
    for prev in (0, 5, 123, 30000):
        frac = torch_mask(prev, gamma).float().mean().item()
        assert abs(frac - gamma) < 5 * sd, (prev, frac)
    # Over many previous tokens the fraction is gamma to within a much tighter bound.
    keys = torch.tensor([prev_key(p) for p in range(64)], dtype=torch.int64)
    frac = green_mask(keys, column_counters(V), green_threshold(gamma)).float().mean().item()
    assert abs(frac - gamma) < 5 * sd / 8


def test_green_list_is_deterministic_and_depends_on_prev() -> None:
    a, b = torch_mask(42, 0.5), torch_mask(43, 0.5)
    assert torch.equal(a, torch_mask(42, 0.5))
    # Two independent halves agree on about half of the vocabulary.
    agree = (a == b).float().mean().item()
    assert 0.48 < agree < 0.52
    assert is_green(42, int(a.nonzero()[0]), 0.5)
    assert not is_green(42, int((~a).nonzero()[0]), 0.5)


def test_larger_gamma_is_a_superset() -> None:
    """One hash, thresholds compared: the 0.25 list is inside the 0.5 list."""
    small, big = torch_mask(7, 0.25), torch_mask(7, 0.5)
    assert bool((small & ~big).sum() == 0) and small.sum() < big.sum()


def test_green_threshold_range() -> None:
    for bad in (0.0, 1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            green_threshold(bad)
    assert effective_gamma(0.5) == 0.5
    assert abs(effective_gamma(0.3) - 0.3) < 2**-23


# ---------------------------------------------------------------------------- sampler bias


def row(params: SamplingParams, prompt: list[int], output: list[int] | None = None,
        seed: int = 0) -> SamplingRow:
    return SamplingRow(params=params, seed=seed, prompt_token_ids=prompt,
                       output_token_ids=list(output or []), stop_token_ids=[])


def test_bias_adds_exactly_delta_on_green_ids_of_watermarked_rows() -> None:
    vocab, delta = 1000, 2.0
    sampler = Sampler(vocab, watermark=WatermarkBias(0.5, delta))
    logits = torch.randn(4, vocab + 24, generator=torch.Generator().manual_seed(0))
    on = SamplingParams(watermark=True)
    off = SamplingParams()
    greedy_on = SamplingParams(temperature=0.0, watermark=True)
    rows = [row(on, [5, 9]), row(off, [5, 9]), row(greedy_on, [1], [3, 8]), row(off, [2], [4])]
    got = sampler.processed_logits(logits, sampler.prepare(rows))
    x = logits[:, :vocab].float()
    for i, prev in ((0, 9), (2, 8)):  # the prompt's last token, then the last output token
        green = torch_mask(prev, 0.5, vocab)
        assert torch.equal(got[i][green], x[i][green] + delta)
        assert torch.equal(got[i][~green], x[i][~green])
    # Rows without the watermark: bit for bit what they give in a batch without it.
    plain = sampler.processed_logits(logits, sampler.prepare([row(off, [5, 9])] * 4))
    assert torch.equal(got[1], plain[1]) and torch.equal(got[3], plain[3])
    assert torch.equal(got[1], x[1])


def test_bias_comes_after_penalties_and_before_temperature() -> None:
    vocab = 500
    sampler = Sampler(vocab, watermark=WatermarkBias(0.25, 3.0))
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1))
    base = SamplingParams(repetition_penalty=1.3)
    penalized = sampler.processed_logits(logits, sampler.prepare([row(base, [1, 2, 3])]))[0]
    hot = SamplingParams(repetition_penalty=1.3, temperature=0.5, watermark=True)
    got = sampler.processed_logits(logits, sampler.prepare([row(hot, [1, 2, 3])]))[0]
    green = torch_mask(3, 0.25, vocab)
    assert torch.equal(got, (penalized + 3.0 * green.float()) / 0.5)


def test_watermarked_sampling_prefers_green_ids() -> None:
    """Flat logits: with delta = 2 a green id is e^2 times as likely; most draws are green."""
    vocab = 2000
    sampler = Sampler(vocab)
    params = SamplingParams(watermark=True)
    rows = [row(params, [p], seed=s) for s in range(8) for p in (11, 12, 13, 14)]
    out = sampler.sample(torch.zeros(len(rows), vocab), sampler.prepare(rows))
    green = sum(is_green(r.prompt_token_ids[-1], t, 0.5) for r, t in zip(rows, out.token_ids))
    assert green >= 24  # expected e^2 / (1 + e^2) = 88% of 32


def test_watermark_rows_cost_nothing_when_absent() -> None:
    sampler = Sampler(100)
    meta = sampler.prepare([row(SamplingParams(), [1])])
    assert meta.watermark_keys is None and meta.watermark_rows is None


def test_bias_in_row_chunks_equals_one_block() -> None:
    vocab = 300
    wm = WatermarkBias(0.5, 2.0)
    keys = WatermarkBias.keys([3, 1, 4, 1, 5], torch.device("cpu"))
    counters = column_counters(vocab)
    x = torch.randn(7, vocab, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([6, 0, 2, 3, 5])
    one, chunked = x.clone(), x.clone()
    wm.apply(one, rows, keys, counters)
    wm.chunk_elems = vocab * 2  # two rows at a time
    wm.apply(chunked, rows, keys, counters)
    assert torch.equal(one, chunked)
    assert torch.equal(one[[1, 4]], x[[1, 4]])


# ---------------------------------------------------------------------------- detection


def test_z_score_formula() -> None:
    assert z_score(60, 100, 0.5) == pytest.approx(2.0)
    assert z_score(50, 100, 0.5) == 0.0
    assert z_score(40, 100, 0.25) == pytest.approx(15 / math.sqrt(18.75))
    assert z_score(0, 0, 0.5) == 0.0


def test_score_counts_green_tokens_after_the_first() -> None:
    rng = random.Random(0)
    ids = [rng.randrange(V) for _ in range(50)]
    s = score_tokens(ids, 0.5)
    green = sum(is_green(a, b, 0.5) for a, b in itertools.pairwise(ids))
    assert (s.num_tokens, s.num_scored, s.num_green) == (50, 49, green)
    assert s.z == pytest.approx(z_score(green, 49, 0.5))
    assert score_tokens([7], 0.5).num_scored == 0


def test_repeated_bigrams_are_scored_once_by_default() -> None:
    ids = [10, 20, 10, 20, 10, 20, 30]
    assert score_tokens(ids).num_scored == 3  # (10,20), (20,10), (20,30)
    assert score_tokens(ids, ignore_repeated_bigrams=False).num_scored == 6


def test_all_green_text_scores_high_and_random_text_near_zero() -> None:
    rng = random.Random(1)
    ids = [rng.randrange(V)]
    while len(ids) < 101:  # each next token drawn from the green list of its predecessor
        t = rng.randrange(V)
        if is_green(ids[-1], t, 0.5):
            ids.append(t)
    s = score_tokens(ids, 0.5)
    assert s.num_green == s.num_scored == 100 and s.z == pytest.approx(10.0)
    assert s.p_value < 1e-20
    zs = [score_tokens([rng.randrange(V) for _ in range(200)], 0.5).z for _ in range(300)]
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / len(zs))
    assert abs(mean) < 0.25 and 0.8 < sd < 1.2


# ---------------------------------------------------------------------------- config


def test_config_validates_and_routes() -> None:
    cfg = EngineConfig.from_kwargs(watermark_gamma=0.25, watermark_delta=3.0)
    assert (cfg.watermark.watermark_gamma, cfg.watermark.watermark_delta) == (0.25, 3.0)
    assert EngineConfig().watermark == WatermarkConfig(0.5, 2.0)
    back = msgspec.json.decode(msgspec.json.encode(cfg), type=EngineConfig)  # engine process
    assert back.watermark == cfg.watermark
    for kw, msg in (({"watermark_gamma": 0.0}, "--watermark-gamma must be > 0 and < 1"),
                    ({"watermark_gamma": 1.0}, "--watermark-gamma"),
                    ({"watermark_gamma": float("nan")}, "--watermark-gamma"),
                    ({"watermark_delta": -0.1}, "--watermark-delta must be >= 0"),
                    ({"watermark_delta": float("inf")}, "--watermark-delta")):
        with pytest.raises(ValueError, match=msg):
            EngineConfig.from_kwargs(**kw)
    with pytest.raises(ValueError):
        WatermarkBias(0.5, -1.0)


def test_sampling_params_carry_watermark_over_msgpack() -> None:
    p = SamplingParams(watermark=True)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams).watermark
    assert b"watermark" not in msgspec.msgpack.encode(SamplingParams())  # omitted at default
