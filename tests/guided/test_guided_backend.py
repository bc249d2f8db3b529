"""The grammar backend on its own: compile checks and their caps, matchers, batched masks, the
torch bitmask → logits apply, and GrammarSpec over the IPC codec. No model weights."""

from __future__ import annotations

import json
import time

import msgspec
import pytest
import torch

from tokenmill.guided import GrammarError, GrammarLimits, GrammarSpec, check_grammar, spec_key
from tokenmill.guided.backend import LRUCache
from tokenmill.guided.bitmask import GrammarMasker, apply_bias_, bitmask_to_bias
from tokenmill.guided.llg_backend import LLGuidanceBackend
from tokenmill.protocol import EngineRequest, SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tok():
    from tokenmill.frontend.llm_engine import load_tokenizer
    from tokenmill.loader import resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def backend(tok) -> LLGuidanceBackend:
    return LLGuidanceBackend.from_tokenizer(tok, 49152, [EOS])


def js(schema: object) -> GrammarSpec:
    return GrammarSpec(kind="json", value=json.dumps(schema, separators=(",", ":")))


def allowed(backend: LLGuidanceBackend, matcher) -> set[int]:
    buf = torch.zeros((1, backend.bitmask_words), dtype=torch.int32)
    backend.fill_bitmask([matcher], buf)
    bias = bitmask_to_bias(buf, 49152)[0]
    return set((bias == 0).nonzero().squeeze(1).tolist())


# ---------------------------------------------------------------- compile checks


@pytest.mark.parametrize("spec", [
    js({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    js({}), js(True), GrammarSpec(kind="json_object"),
    js({"$defs": {"p": {"type": "string"}}, "type": "array", "items": {"$ref": "#/$defs/p"}}),
    GrammarSpec(kind="regex", value=r"\d{3}-[a-z]+"),
    GrammarSpec(kind="lark", value='start: "yes" | "no"'),
])
def test_valid_grammars_pass(spec: GrammarSpec) -> None:
    check_grammar(spec)
    SamplingParams(grammar=spec).validate()


@pytest.mark.parametrize(("spec", "needle"), [
    (js({"type": "foo"}), "Invalid type"),
    (GrammarSpec(kind="json", value="{not json"), "not valid JSON"),
    (GrammarSpec(kind="json", value="[1, 2]"), "object or a boolean"),
    (js({"type": "array", "uniqueItems": True}), "Unimplemented keys"),
    (js({"properties": {"a": {"$ref": "#/nope"}}}), "/nope"),
    (GrammarSpec(kind="regex", value="a(b"), "unclosed group"),
    (GrammarSpec(kind="regex", value="(?=a)b"), "look-around"),
    (GrammarSpec(kind="lark", value="start: foo"), "unknown name"),
    (GrammarSpec(kind="lark", value="start: ("), "1("),
])
def test_invalid_grammars_carry_the_compiler_message(spec: GrammarSpec, needle: str) -> None:
    with pytest.raises(GrammarError) as e:
        check_grammar(spec)
    assert needle in str(e.value)
    with pytest.raises(ValueError) as v:  # the same through SamplingParams.validate
        SamplingParams(grammar=spec).validate()
    assert str(v.value) == str(e.value)


def test_deep_nesting_and_size_cap() -> None:
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(GrammarError, match="recursion limit"):
        check_grammar(js(deep))
    big = js({"enum": [f"value number {i}" for i in range(10_000)]})  # ~190 KB
    with pytest.raises(GrammarError, match="too large"):
        check_grammar(big)
    small = LLGuidanceBackend(limits=GrammarLimits(max_grammar_bytes=100))
    with pytest.raises(GrammarError, match="over 100 bytes"):
        small.check(GrammarSpec(kind="regex", value="é" * 60))  # 60 characters, 120 bytes


def test_check_results_are_cached_by_content() -> None:
    b = LLGuidanceBackend(limits=GrammarLimits(cache_entries=2))
    spec = GrammarSpec(kind="regex", value="x+")
    b.check(spec)
    b.check(GrammarSpec(kind="regex", value="x+"))  # equal content, another object
    assert (b._checked.hits, b._checked.misses) == (1, 1)
    assert spec_key(spec) != spec_key(GrammarSpec(kind="lark", value="x+"))
    for i in range(40):
        with pytest.raises(GrammarError):
            b.check(GrammarSpec(kind="regex", value=f"({i}"))
    assert len(b._checked) == 16  # 8 x cache_entries: bounded


def test_lru_cache_evicts_least_recent() -> None:
    c: LRUCache[str, int] = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3


def test_costly_schemas_compile_within_budget(backend: LLGuidanceBackend) -> None:
    """The worst valid grammars under the 64 KiB cap we found compile in well under a second
    (measured ~10-40 ms each on the 2-core CI machine; the budget is llguidance's fuel)."""
    cases = {
        "enum": js({"enum": [f"v{i}" for i in range(7000)]}),
        "anyOf": js({"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}},
                                "required": [f"k{i}"]} for i in range(650)]}),
        "pattern": js({"type": "string",
                       "pattern": "^(" + "|".join(f"w{i}x{i * 7}" for i in range(5000)) + ")$"}),
        "any": js({}),
    }
    for name, spec in cases.items():
        assert len(spec.value) < 64 * 1024, name
        t0 = time.perf_counter()
        backend.check(spec)
        m = backend.matcher(spec)
        allowed(backend, m)
        assert not m.error and time.perf_counter() - t0 < 2.0, name


# ---------------------------------------------------------------- matchers and masks


def test_matcher_follows_json_and_ends_with_eos(backend: LLGuidanceBackend, tok) -> None:
    m = backend.matcher(js({"type": "object", "properties": {"ok": {"type": "boolean"}},
                            "required": ["ok"], "additionalProperties": False}))
    ids = tok.encode('{"ok":true}', add_special_tokens=False)
    first = allowed(backend, m)
    assert ids[0] in first and EOS not in first
    for t in ids:
        assert t in allowed(backend, m)
        assert m.consume(t)
    assert m.is_stopped and allowed(backend, m) == {EOS}
    assert m.rollback(len(ids)) and not m.is_stopped and allowed(backend, m) == first
    assert m.replay(ids) and m.is_stopped
    assert m.consume(EOS) and m.consume(EOS) and not m.error  # ignore_eos keeps feeding EOS


def test_forbidden_token_is_an_error_that_allows_eos(backend: LLGuidanceBackend, tok) -> None:
    m = backend.matcher(GrammarSpec(kind="regex", value="ab"))
    assert not m.consume(tok.encode("x", add_special_tokens=False)[0])
    assert m.error and m.is_stopped and EOS in allowed(backend, m)


def test_matchers_are_independent_copies(backend: LLGuidanceBackend, tok) -> None:
    spec = GrammarSpec(kind="regex", value="(yes|no)")
    a, b = backend.matcher(spec), backend.matcher(spec)
    for t in tok.encode("yes", add_special_tokens=False):
        a.consume(t)
    assert a.is_stopped and not b.is_stopped


def test_batched_fill_equals_one_by_one(backend: LLGuidanceBackend, tok) -> None:
    specs = [GrammarSpec(kind="regex", value="[0-9]{2,4}"), GrammarSpec(kind="json_object"),
             js({"enum": ["alpha", "beta"]}), GrammarSpec(kind="lark", value='start: "x"+')]
    ms = [backend.matcher(s) for s in specs]
    ms[1].replay(tok.encode('{"a":', add_special_tokens=False))
    buf = torch.full((6, backend.bitmask_words), 7, dtype=torch.int32)
    backend.fill_bitmask(ms, buf)
    for i, m in enumerate(ms):
        one = torch.zeros((1, backend.bitmask_words), dtype=torch.int32)
        backend.fill_bitmask([m], one)
        assert torch.equal(buf[i], one[0])
    assert (buf[4:] == 7).all()  # rows past the matchers untouched
    with pytest.raises(ValueError, match="int32"):
        backend.fill_bitmask(ms, torch.zeros((2, backend.bitmask_words), dtype=torch.int32))


def test_engine_side_compile_failure_is_an_error_matcher(backend: LLGuidanceBackend) -> None:
    m = backend.matcher(GrammarSpec(kind="regex", value="a(b"))  # skipped check(): engine path
    assert m.error and m.is_stopped and allowed(backend, m) == {EOS}


# ---------------------------------------------------------------- torch apply


@pytest.mark.parametrize("width", [1, 31, 32, 33, 100, 49152])
def test_bitmask_to_bias_matches_bits(width: int) -> None:
    g = torch.Generator().manual_seed(width)
    words = (width + 31) // 32
    bm = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    bias = bitmask_to_bias(bm, width)
    bits = [[(int(bm[r, t // 32]) >> (t % 32)) & 1 for t in range(width)] for r in range(3)]
    want = torch.tensor(bits, dtype=torch.bool)
    assert bias.shape == (3, width) and bias.dtype == torch.float32
    assert torch.equal(bias == 0, want) and torch.equal(torch.isneginf(bias), ~want)
    with pytest.raises(ValueError, match="covers"):
        bitmask_to_bias(bm, words * 32 + 1)


def test_apply_bias_touches_only_constrained_rows() -> None:
    logits = torch.randn(4, 64)
    keep = logits.clone()
    bm = torch.zeros((2, 2), dtype=torch.int32)
    bm[0, 0] = 1 << 5  # row 0: token 5 only
    bm[1, 1] = -2**31  # row 1: token 63 only (the sign bit)
    apply_bias_(logits, bitmask_to_bias(bm, 64), torch.tensor([1, 3]))
    assert torch.equal(logits[0], keep[0]) and torch.equal(logits[2], keep[2])
    assert logits[1].argmax() == 5 and torch.isfinite(logits[1]).sum() == 1
    assert logits[3].argmax() == 63 and logits[3, 63] == keep[3, 63]
    all_rows = keep.clone()
    apply_bias_(all_rows, bitmask_to_bias(torch.full((4, 2), -1, dtype=torch.int32), 64), None)
    assert torch.equal(all_rows, keep)


def test_masker_overlaps_and_returns_the_bias(backend: LLGuidanceBackend) -> None:
    masker = GrammarMasker(backend, 49152, torch.device("cpu"))
    ms = [backend.matcher(GrammarSpec(kind="regex", value="z")) for _ in range(3)]
    bias = masker.bias(masker.start(ms))
    assert bias.shape == (3, 49152) and ((bias == 0).sum(dim=1) >= 1).all()
    masker.close()


# ---------------------------------------------------------------- IPC


def test_grammar_crosses_the_process_boundary_as_msgpack() -> None:
    spec = js({"type": "object", "properties": {"é": {"const": 1}}})
    er = EngineRequest(request_id="r", prompt_token_ids=[1, 2],
                       params=SamplingParams(temperature=0.0, grammar=spec))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(er), type=EngineRequest)
    assert back.params.grammar == spec
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"kind": "xml", "value": ""}),
                               type=GrammarSpec)
    plain = msgspec.msgpack.encode(SamplingParams())
    assert b"grammar" not in plain  # omitted when unset: free requests pay nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bias_matches_cpu(backend: LLGuidanceBackend, tok) -> None:
    ms = [backend.matcher(GrammarSpec(kind="regex", value="[0-9]{3}")),
          backend.matcher(GrammarSpec(kind="json_object"))]
    cpu = GrammarMasker(backend, 49152, torch.device("cpu"))
    gpu = GrammarMasker(backend, 49152, torch.device("cuda"))
    want = cpu.bias(cpu.start(ms))
    got = gpu.bias(gpu.start(ms))
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    logits = torch.randn(3, 49152, device="cuda")
    apply_bias_(logits, got, torch.tensor([0, 2], device="cuda"))
    assert torch.isneginf(logits[0]).sum() == torch.isneginf(want[0]).sum()
