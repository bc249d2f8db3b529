"""The watermark on the default model (SmolLM2-135M-Instruct): watermarked generations are
detected (z > 4) and unwatermarked ones are not (|z| < 2), from the token ids and from the
text alone; a mixed batch leaves the unwatermarked requests as they are alone."""

from __future__ import annotations

import pytest

from tokenmill.protocol import SamplingParams
from tokenmill.watermark import score_tokens

pytestmark = pytest.mark.slow

PROMPTS = ["Write a short story about a lighthouse keeper.",
           "Explain how vaccines work.",
           "Give me advice on learning to cook."]
SEEDS = [1, 2]


@pytest.fixture(scope="module")
def llm():
    from tokenmill import LLM

    return LLM(device="cpu", max_batch_total_tokens=16384)


def chat_ids(llm, text: str) -> list[int]:
    tok = llm.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True)
    return tok.encode(rendered, add_special_tokens=False)


def test_z_scores_of_200_token_generations(llm) -> None:
    """12 requests in one batch: 3 prompts x 2 seeds, with and without the watermark."""
    prompts, params, labels = [], [], []
    for wm in (True, False):
        for seed in SEEDS:
            for i, text in enumerate(PROMPTS):
                prompts.append(chat_ids(llm, text))
                params.append(SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed,
                                             ignore_eos=True, watermark=wm))
                labels.append((wm, seed, i))
    outs = llm.generate(prompts, params)
    tok = llm.tokenizer
    for (wm, seed, i), out in zip(labels, outs):
        assert len(out.token_ids) == 200
        ids = score_tokens(out.token_ids)
        text = score_tokens(tok.encode(out.text, add_special_tokens=False))  # detector's view
        print(f"watermark={wm} seed={seed} prompt={i}: z(ids)={ids.z:.2f} "
              f"z(text)={text.z:.2f} green={ids.num_green}/{ids.num_scored}")
        if wm:
            assert ids.z > 4 and text.z > 4
        else:
            assert abs(ids.z) < 2 and abs(text.z) < 2
    # Same seed, same prompt: the watermark changed the text.
    assert outs[0].token_ids != outs[len(outs) // 2].token_ids


def test_mixed_batch_leaves_unwatermarked_requests_alone(llm) -> None:
    a, b = chat_ids(llm, PROMPTS[0]), chat_ids(llm, PROMPTS[1])
    plain = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True),
             SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)]
    marked = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True,
                             watermark=True),
              SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True,
                             watermark=True)]
    alone = [llm.generate(a, plain[0])[0].token_ids, llm.generate(b, plain[1])[0].token_ids]
    mixed = llm.generate([a, a, b, b], [marked[0], plain[0], marked[1], plain[1]])
    assert [mixed[1].token_ids, mixed[3].token_ids] == alone
    assert mixed[0].token_ids != alone[0]
    assert mixed[2].token_ids != alone[1]  # greedy rows are watermarked too (as in TGI)
