"""Constrained decoding end to end on the default model (offline LLM): every output parses and
validates, ends because the grammar is complete, leaves free requests alone, and survives
preemption and batching unchanged."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
from guided_cases import REGEXES, SCHEMAS

from tokenmill.protocol import FinishReason, GrammarSpec, SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW = 200


def chat_ids(llm, text: str) -> list[int]:
    tok = llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": text}],
                                     add_generation_prompt=True)
    return tok.encode(prompt, add_special_tokens=False)


def schema_prompt(desc: str, schema: dict) -> str:
    return f"Reply with JSON for {desc}, following this JSON Schema: {json.dumps(schema)}"


def js(schema: dict) -> GrammarSpec:
    return GrammarSpec(kind="json", value=json.dumps(schema))


def test_json_schemas_parse_and_validate_greedy_and_sampled(llm) -> None:
    assert len(SCHEMAS) >= 20
    prompts, params = [], []
    for temperature in (0.0, 1.0):
        for i, (desc, schema) in enumerate(SCHEMAS):
            prompts.append(chat_ids(llm, schema_prompt(desc, schema)))
            params.append(SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature,
                                         seed=100 + i, grammar=js(schema)))
    outs = llm.generate(prompts, params)
    for out, sp, (desc, schema) in zip(outs, params, SCHEMAS * 2):
        where = f"{desc!r} at T={sp.temperature}: {out.text!r}"
        # Ended because the grammar was complete (EOS forced), never by the token budget.
        assert out.finish_reason is FinishReason.EOS, where
        assert len(out.token_ids) < MAX_NEW, where
        jsonschema.validate(json.loads(out.text), schema)
        # Compact JSON: no whitespace outside string literals.
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', out.text)), where


def test_regex_outputs_fully_match(llm) -> None:
    prompts, params = [], []
    for temperature in (0.0, 1.0):
        for i, (question, pattern) in enumerate(REGEXES):
            prompts.append(chat_ids(llm, question))
            params.append(SamplingParams(max_new_tokens=64, temperature=temperature, seed=i,
                                         grammar=GrammarSpec(kind="regex", value=pattern)))
    for out, sp in zip(llm.generate(prompts, params), params):
        assert sp.grammar is not None
        assert re.fullmatch(sp.grammar.value, out.text), (sp.grammar.value, out.text)
        assert out.finish_reason is FinishReason.EOS


def test_free_requests_are_unchanged_by_constrained_neighbours(llm) -> None:
    free = [chat_ids(llm, q) for q in ("Tell me about rivers.", "What is 2+2?",
                                       "Write a haiku.", "Name three colours.")]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    alone = [llm.generate(p, greedy)[0].token_ids for p in free]
    guided = [SamplingParams(max_new_tokens=60, temperature=t, seed=7, grammar=js(s))
              for t in (0.0, 1.0) for _, s in SCHEMAS[:2]]
    mixed = llm.generate([free[0], chat_ids(llm, "A person as JSON"), free[1], free[2],
                          chat_ids(llm, "An answer"), free[3], chat_ids(llm, "Person"),
                          chat_ids(llm, "Answer")],
                         [greedy, guided[0], greedy, greedy, guided[1], greedy, guided[2],
                          guided[3]])
    assert [mixed[i].token_ids for i in (0, 2, 3, 5)] == alone
    for i in (1, 4, 6, 7):
        json.loads(mixed[i].text)


def test_seeded_constrained_sampling_is_reproducible(llm) -> None:
    desc, schema = SCHEMAS[9]
    ids = chat_ids(llm, schema_prompt(desc, schema))
    sp = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.2, top_p=0.95, seed=31337,
                        grammar=js(schema))
    alone = llm.generate(ids, sp)[0]
    others = [SamplingParams(max_new_tokens=40, temperature=1.0, grammar=js(s))
              for _, s in SCHEMAS[:3]]
    batch = llm.generate([chat_ids(llm, "x"), ids, chat_ids(llm, "y"), chat_ids(llm, "z")],
                         [others[0], sp, others[1], others[2]])
    assert batch[1].token_ids == alone.token_ids
    jsonschema.validate(json.loads(alone.text), schema)


def test_preempted_constrained_requests_match_roomy_run(llm) -> None:
    from tokenmill.llm import LLM

    prompts = [llm.tokenizer.encode(f"JSON for {desc}:") for desc, _ in SCHEMAS[:8]]
    params = [SamplingParams(max_new_tokens=48, temperature=0.0 if i % 2 else 0.9, seed=i,
                             grammar=js(schema)) for i, (_, schema) in enumerate(SCHEMAS[:8])]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    tight = LLM(device="cpu", max_batch_total_tokens=128, block_size=16)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.engine.kv.num_free_blocks == tight.engine.kv.num_blocks


def test_endless_grammar_stops_at_max_new_tokens(llm) -> None:
    # Endless whitespace is allowed and the only ending is far past the budget.
    spec = GrammarSpec(kind="regex", value=r"[ \t\n]*(abcdefghij){40}")
    outs = llm.generate([chat_ids(llm, "Say something.")] * 2,
                        [SamplingParams(max_new_tokens=32, temperature=t, seed=1, grammar=spec)
                         for t in (0.0, 2.0)])
    for out in outs:
        assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 32
        assert re.fullmatch(r"[ \t\n]*(abcdefghij)*(a(b(c(d(e(f(g(h(i)?)?)?)?)?)?)?)?)?",
                            out.text), out.text


def test_min_new_tokens_and_ignore_eos_defer_to_the_grammar(llm) -> None:
    ids = chat_ids(llm, "Is fire hot? Answer yes or no.")
    spec = GrammarSpec(kind="regex", value="(yes|no)")
    short = llm.generate(ids, SamplingParams(temperature=0.0, grammar=spec))[0]
    late = llm.generate(ids, SamplingParams(temperature=0.0, grammar=spec, min_new_tokens=5))[0]
    keep = llm.generate(ids, SamplingParams(temperature=0.0, grammar=spec, ignore_eos=True,
                                            max_new_tokens=6))[0]
    eos = llm.engine.info.eos_token_ids
    assert short.text in ("yes", "no") and short.finish_reason is FinishReason.EOS
    # The grammar's EOS is never masked; after it only EOS can follow, which the text hides.
    assert late.text == short.text and late.finish_reason is FinishReason.EOS
    assert len(late.token_ids) == 5 and set(late.token_ids[len(short.token_ids) - 1:]) <= set(eos)
    assert keep.text == short.text and keep.finish_reason is FinishReason.LENGTH
    assert len(keep.token_ids) == 6


def test_logprobs_are_of_the_grammar_restricted_distribution(llm) -> None:
    ids = chat_ids(llm, "Is fire hot? Answer yes or no.")
    out = llm.generate(ids, SamplingParams(temperature=0.0, logprobs=5,
                                           grammar=GrammarSpec(kind="regex", value="(yes|no)")))[0]
    assert out.logprobs is not None
    first = out.logprobs[0]
    tok = llm.tokenizer
    assert first.top, "the top alternatives keep the allowed tokens"
    for t, lp in first.top:
        assert math.isfinite(lp)  # forbidden tokens (-inf) are dropped
        text = tok.decode([t])
        assert "yes".startswith(text) or "no".startswith(text), text
    # Renormalized over the allowed tokens: the chosen token is the top one under greedy.
    assert first.top[0][0] == first.token_id and first.logprob == first.top[0][1]
    assert sum(math.exp(lp) for _, lp in first.top) <= 1 + 1e-5
