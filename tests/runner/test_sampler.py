"""The vectorized sampler against transformers' logits processors and hand-written formulas."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # src layout, not installed

from tokenmill.protocol import SamplingParams
from tokenmill.runner.sampler import (
    Sampler,
    SamplingRow,
    column_counters,
    counter_uniform,
    row_key,
)

try:
    from transformers.generation import logits_process as hf
except ImportError:  # pragma: no cover - transformers is a test dependency
    hf = None  # type: ignore[assignment]

needs_hf = pytest.mark.skipif(hf is None, reason="transformers not installed")


def make_row(
    params: SamplingParams,
    seed: int = 0,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    stop: list[int] | None = None,
) -> SamplingRow:
    return SamplingRow(params=params, seed=seed, prompt_token_ids=list(prompt or []),
                       output_token_ids=list(output or []), stop_token_ids=list(stop or []))


def reference_logits(logits: torch.Tensor, row: SamplingRow, vocab_size: int) -> torch.Tensor:
    """What the row samples from, built from transformers' processors and the OpenAI formula."""
    p = row.params
    scores = logits[:, :vocab_size].float().clone()
    if p.repetition_penalty != 1.0:
        ids = [t for t in row.prompt_token_ids + row.output_token_ids if 0 <= t < vocab_size]
        input_ids = torch.tensor([ids], dtype=torch.long).reshape(1, -1)
        scores = hf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, scores)
    for t in set(row.output_token_ids):
        count = row.output_token_ids.count(t)
        scores[0, t] -= p.frequency_penalty * count + p.presence_penalty
    if len(row.output_token_ids) < p.min_new_tokens:
        for t in row.stop_token_ids:
            if 0 <= t < vocab_size:
                scores[0, t] = float("-inf")
    if p.temperature == 0.0:
        return scores
    dummy = torch.zeros((1, 1), dtype=torch.long)
    warpers: list[object] = []
    if p.temperature != 1.0:
        warpers.append(hf.TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        warpers.append(hf.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(hf.TopPLogitsWarper(p.top_p))
    if p.typical_p < 1.0:
        warpers.append(hf.TypicalLogitsWarper(p.typical_p))
    if p.min_p > 0.0:
        warpers.append(hf.MinPLogitsWarper(p.min_p))
    for w in warpers:
        scores = w(dummy, scores)  # type: ignore[operator]
    return scores


# ---------------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_padding_is_never_chosen() -> None:
    torch.manual_seed(0)
    V, pad, B = 100, 28, 32
    logits = torch.randn(B, V + pad, dtype=torch.bfloat16)
    logits[:, V:] = 1e4  # a padded lm_head: huge garbage beyond the vocabulary
    s = Sampler(V)
    out = s.sample(logits, s.prepare([make_row(SamplingParams(temperature=0.0))] * B))
    assert out.token_ids == logits[:, :V].float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * B
    # Sampled rows, with and without filters, stay inside the vocabulary too.
    rows = [make_row(SamplingParams(temperature=1.5, top_p=0.99 if i % 2 else 1.0), seed=i)
            for i in range(B)]
    out = s.sample(logits, s.prepare(rows))
    assert all(0 <= t < V for t in out.token_ids)


def test_greedy_tie_takes_lowest_id() -> None:
    s = Sampler(8)
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0, 0.0, 0.0, 0.0]])
    assert s.sample(logits, s.prepare([make_row(SamplingParams(temperature=0.0))])).token_ids == [1]


# ---------------------------------------------------------------------------------- filters

FILTER_CASES = {
    "temperature": SamplingParams(temperature=0.6),
    "hot": SamplingParams(temperature=1.7),
    "top_k": SamplingParams(top_k=5),
    "top_p": SamplingParams(top_p=0.7),
    "typical_p": SamplingParams(typical_p=0.6),
    "min_p": SamplingParams(min_p=0.15),
    "repetition": SamplingParams(repetition_penalty=1.8),
    "repetition_below_1": SamplingParams(repetition_penalty=0.6, temperature=0.8),
    "combined": SamplingParams(temperature=0.8, top_k=9, top_p=0.9, min_p=0.05,
                               repetition_penalty=1.3),
    "typical_top_p": SamplingParams(temperature=1.2, top_p=0.95, typical_p=0.8),
}


@needs_hf
@pytest.mark.parametrize("name", list(FILTER_CASES))
def test_filter_matches_transformers(name: str) -> None:
    params = FILTER_CASES[name]
    V, n = 16, 6000
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    logits = torch.randn(1, V, generator=g) * 1.5
    prompt, output = [1, 3, 3, 7], [7, 11]
    s = Sampler(V)
    row = make_row(params, seed=0, prompt=prompt, output=output)
    ref = reference_logits(logits, row, V)
    mine = s.processed_logits(logits, s.prepare([row]))
    # Same support, and the same values on it.
    assert torch.equal(torch.isfinite(mine), torch.isfinite(ref))
    keep = torch.isfinite(ref)
    torch.testing.assert_close(mine[keep], ref[keep], rtol=1e-5, atol=1e-5)
    if name != "temperature":
        assert keep.sum() < V or name in ("hot", "repetition", "repetition_below_1")

    # The empirical distribution over many seeds is the reference softmax.
    rows = [make_row(params, seed=seed, prompt=prompt, output=output) for seed in range(n)]
    out = s.sample(logits.expand(n, V), s.prepare(rows))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=V).double() / n
    expected = torch.softmax(ref[0].double(), dim=-1)
    assert float((freq[~keep[0]]).sum()) == 0.0
    tv = 0.5 * float((freq - expected).abs().sum())
    assert tv < 0.05, (name, tv)


@needs_hf
@pytest.mark.parametrize("top_k", [0, 3, 40])
def test_nucleus_candidate_path_matches_full_sort(top_k: int) -> None:
    """On CPU top_p first tries the top-M candidates; rows needing more fall back to a sort."""
    V, B = 512, 24
    torch.manual_seed(1)
    logits = torch.randn(B, V) * torch.linspace(0.2, 6.0, B)[:, None]  # flat ... peaked
    rows = [make_row(SamplingParams(temperature=0.9, top_k=top_k, top_p=(0.3, 0.9, 0.99)[i % 3]),
                     seed=i) for i in range(B)]
    small, full = Sampler(V), Sampler(V)
    small.nucleus_candidates, full.nucleus_candidates = 8, 10**9
    a = small.processed_logits(logits, small.prepare(rows))
    b = full.processed_logits(logits, full.prepare(rows))
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    for i, row in enumerate(rows):
        ref = reference_logits(logits[i : i + 1], row, V)
        assert torch.equal(torch.isfinite(a[i : i + 1]), torch.isfinite(ref)), i
    assert small.sample(logits, small.prepare(rows)).token_ids == \
        full.sample(logits, full.prepare(rows)).token_ids


def test_frequency_and_presence_penalties() -> None:
    V = 10
    torch.manual_seed(2)
    logits = torch.randn(2, V)
    output = [4, 4, 4, 2, 9]
    rows = [
        make_row(SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.25),
                 prompt=[1, 2, 3], output=output),
        make_row(SamplingParams(temperature=0.0, frequency_penalty=-0.7), prompt=[5],
                 output=[0, 0]),
    ]
    s = Sampler(V)
    got = s.processed_logits(logits, s.prepare(rows))
    want = logits.clone()
    for t in set(output):  # prompt tokens are not penalized
        want[0, t] -= 0.5 * output.count(t) + 1.25
    want[1, 0] -= -0.7 * 2
    torch.testing.assert_close(got, want)


def test_repetition_penalty_uses_prompt_and_output_once() -> None:
    V = 6
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    row = make_row(SamplingParams(temperature=0.0, repetition_penalty=2.0),
                   prompt=[0, 1, 1, 1, 99], output=[4, 4])  # 99: outside the vocabulary
    s = Sampler(V)
    got = s.processed_logits(logits, s.prepare([row]))
    assert got.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.25, 3.0]]


def test_min_new_tokens_masks_stop_ids() -> None:
    V = 12
    logits = torch.zeros(1, V)
    logits[0, 2] = 50.0  # EOS is by far the likeliest
    logits[0, 5] = 40.0  # a user stop id
    s = Sampler(V)
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, min_new_tokens=3, stop_token_ids=[5])
        early = [make_row(params, seed=i, output=[1] * n, stop=[2, 5, 1000])
                 for i in range(20) for n in range(3)]
        toks = s.sample(logits.expand(len(early), V), s.prepare(early)).token_ids
        assert all(t not in (2, 5) for t in toks)
        late = make_row(params, seed=0, output=[1, 1, 1], stop=[2, 5])
        assert s.sample(logits, s.prepare([late])).token_ids == [2]


# ---------------------------------------------------------------------------------- randomness


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.3]),
        top_k=rng.choice([0, 0, 5, 50]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        typical_p=rng.choice([1.0, 1.0, 0.9]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.2]),
        frequency_penalty=rng.choice([0.0, 0.4]),
        logprobs=rng.choice([None, 0, 3]),
    )


def test_seeded_rows_ignore_batch_composition() -> None:
    V, B, pos = 1000, 16, 5
    rng = random.Random(3)
    torch.manual_seed(3)
    s = Sampler(V)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=400, min_p=0.001,
                            repetition_penalty=1.2, presence_penalty=0.3)
    row_logits = torch.randn(1, V) * 0.7  # flat enough that the nucleus is large
    tokens = set()
    for seed in range(40):
        step_out = [rng.randrange(V) for _ in range(rng.randrange(5))]
        row = make_row(params, seed=seed, prompt=[1, 2, 3], output=step_out)
        alone = s.sample(row_logits, s.prepare([row])).token_ids[0]
        tokens.add(alone)

        others = [make_row(_random_params(rng), seed=rng.getrandbits(64),
                           prompt=[rng.randrange(V) for _ in range(7)],
                           output=[rng.randrange(V) for _ in range(rng.randrange(4))])
                  for _ in range(B - 1)]
        logits = torch.randn(B, V + 24) * 2
        logits[pos, :V] = row_logits
        batch = [*others[:pos], row, *others[pos:]]
        assert s.sample(logits, s.prepare(batch)).token_ids[pos] == alone

        # Every row with the same params (the "all rows" fast paths, no subsets).
        same = [make_row(params, seed=rng.getrandbits(64)) for _ in range(B - 1)]
        batch = [*same[:pos], row, *same[pos:]]
        assert s.sample(logits, s.prepare(batch)).token_ids[pos] == alone
    assert len(tokens) > 20  # the draws do depend on the seed


def test_different_seeds_give_different_streams() -> None:
    V = 64
    s = Sampler(V)
    logits = torch.zeros(1, V)

    def stream(seed: int) -> list[int]:
        out: list[int] = []
        for _ in range(24):
            out += s.sample(logits, s.prepare([make_row(SamplingParams(), seed, output=out)]))\
                .token_ids
        return out

    a, b = stream(1), stream(2)
    assert a == stream(1)
    assert a != b
    assert sum(x == y for x, y in zip(a, b)) < 6
    assert stream(2**64 - 1) != stream(2**63)  # seeds over the int64 range work


def test_counter_uniform_matches_python_splitmix64() -> None:
    mask = (1 << 64) - 1

    def reference(key: int, v: int) -> float:
        x = (key + (v + 1) * 0x9E3779B97F4A7C15) & mask
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return (2 * (x >> 41) + 1) / 2**24

    keys = [row_key(seed, step) for seed, step in [(0, 0), (1, 5), (2**64 - 1, 3), (42, 10**6)]]
    u = counter_uniform(torch.tensor(keys), column_counters(300))
    want = [[reference(k, v) for v in range(300)] for k in keys]
    assert u.double().tolist() == want


def test_counter_uniform_is_uniform_and_streams_do_not_collide() -> None:
    seeds, steps, V = 48, 6, 4096
    key_list = [row_key(seed, step) for seed in range(seeds) for step in range(steps)]
    assert len(set(key_list)) == len(key_list)
    assert len({row_key(seed, step) for seed in range(300) for step in range(300)}) == 90000
    u = counter_uniform(torch.tensor(key_list), column_counters(V)).double()
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    flat = u.flatten()
    assert abs(float(flat.mean()) - 0.5) < 0.002
    assert abs(float(flat.var()) - 1 / 12) < 0.002
    srt = flat.sort().values
    n = srt.numel()
    ks = float((srt - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max())
    assert ks < 3 / math.sqrt(n)  # Kolmogorov-Smirnov; ~2e-3 would already be p < 1e-5
    # Adjacent steps of one seed and adjacent seeds at one step: unrelated streams.
    grid = u.view(seeds, steps, V)
    for a, b in [(grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:])]:
        assert float((a == b).double().mean()) < 1e-4
        corr = ((a - 0.5) * (b - 0.5)).mean() / (1 / 12)
        assert abs(float(corr)) < 0.01
    # Neighbouring columns of one row are not correlated either.
    corr = ((u[:, :-1] - 0.5) * (u[:, 1:] - 0.5)).mean() / (1 / 12)
    assert abs(float(corr)) < 0.01


# ---------------------------------------------------------------------------------- logprobs


def test_logprobs_are_from_the_raw_distribution() -> None:
    V, pad = 50, 14
    torch.manual_seed(4)
    logits = (torch.randn(4, V + pad) * 3).half()
    rows = [
        make_row(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
                 prompt=[1, 2, 3]),
        make_row(SamplingParams(temperature=0.7, top_p=0.8, logprobs=0), seed=9),
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=2.0, top_k=3, logprobs=V + 10), seed=3,
                 output=[4, 4]),
    ]
    s = Sampler(V)
    out = s.sample(logits, s.prepare(rows))
    raw = torch.log_softmax(logits[:, :V].float(), dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(raw[i, lp.token_id]), abs=1e-5)
        n = rows[i].params.logprobs or 0
        assert len(lp.top) == min(n, V)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        for tok, v in lp.top:
            assert 0 <= tok < V
            assert v == pytest.approx(float(raw[i, tok]), abs=1e-5)
        if n:
            assert [t for t, _ in lp.top] == raw[i].topk(min(n, V)).indices.tolist()
    assert out.logprobs[1] is not None and out.logprobs[1].top == []


def test_prompt_logprobs() -> None:
    V, pad, N = 40, 8, 33
    torch.manual_seed(5)
    logits = torch.randn(N, V + pad, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N,))
    s = Sampler(V)
    s.prompt_chunk_elems = 5 * V  # several chunks
    got = s.prompt_logprobs(logits, targets, num_top=3)
    raw = torch.log_softmax(logits[:, :V].float(), dim=-1)
    assert len(got) == N
    for i, lp in enumerate(got):
        assert lp.token_id == int(targets[i])
        assert lp.logprob == pytest.approx(float(raw[i, targets[i]]), abs=1e-5)
        assert [t for t, _ in lp.top] == raw[i].topk(3).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(raw[i].topk(3).values.tolist(), abs=1e-5)
    assert all(lp.top == [] for lp in s.prompt_logprobs(logits, targets, num_top=0))
    assert s.prompt_logprobs(logits[:0], targets[:0], num_top=2) == []


# ---------------------------------------------------------------------------------- property


@needs_hf
@settings(max_examples=150, deadline=None)
@given(
    logit_seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.1, 6.0),
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    top_k=st.integers(0, 20),
    top_p=st.floats(0.01, 1.0),
    typical_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    repetition_penalty=st.one_of(st.just(1.0), st.floats(0.3, 3.0)),
    frequency_penalty=st.floats(-2.0, 2.0),
    presence_penalty=st.floats(-2.0, 2.0),
    min_new_tokens=st.integers(0, 3),
    seed=st.integers(0, 2**64 - 1),
    prompt=st.lists(st.integers(0, 15), max_size=6),
    output=st.lists(st.integers(0, 15), max_size=5),
    stop=st.lists(st.integers(0, 20), max_size=3),
)
def test_sampled_token_is_allowed_by_reference(
    logit_seed: int, scale: float, temperature: float, top_k: int, top_p: float,
    typical_p: float, min_p: float, repetition_penalty: float, frequency_penalty: float,
    presence_penalty: float, min_new_tokens: int, seed: int, prompt: list[int],
    output: list[int], stop: list[int],
) -> None:
    V = 16
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, min_new_tokens=min_new_tokens,
    )
    params.validate()
    g = torch.Generator().manual_seed(logit_seed)
    logits = torch.randn(1, V + 5, generator=g) * scale
    logits[:, V:] = 100.0
    row = make_row(params, seed=seed, prompt=prompt, output=output, stop=[*stop, 2])
    s = Sampler(V)
    token = s.sample(logits, s.prepare([row])).token_ids[0]
    ref = reference_logits(logits, row, V)
    assert 0 <= token < V
    assert math.isfinite(float(ref[0, token]))
    if temperature == 0.0:
        assert token == int(ref.argmax())


def test_plain_greedy_path_matches_the_processed_path() -> None:
    """Greedy rows with nothing to apply take the argmax off the model's logits without the
    float32 copy; a row that needs processing (here: logprobs) sends the batch through the
    full path. Same tokens."""
    gen = torch.Generator().manual_seed(11)
    V, B = 300, 17
    logits = torch.randn(B, V + 20, generator=gen).to(torch.bfloat16)
    logits[3, 10] = logits[3, 200] = 9.0  # a tie: lowest id
    s = Sampler(V)
    plain = s.prepare([make_row(SamplingParams(temperature=0.0))] * B)
    assert plain.plain_greedy
    fast = s.sample(logits, plain).token_ids
    full = s.prepare([make_row(SamplingParams(temperature=0.0, logprobs=0))] * B)
    assert not full.plain_greedy
    assert s.sample(logits, full).token_ids == fast == logits[:, :V].float().argmax(-1).tolist()
    assert fast[3] == 10
    with pytest.raises(ValueError):
        s.sample(logits[:, : V - 1], plain)
