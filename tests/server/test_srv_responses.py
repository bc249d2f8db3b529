"""Response bodies built from hand-made RequestOutputs, checked against TGI's shapes (the
`text_generation` client's types), the openai client's types and our own schemas."""

from __future__ import annotations

import math
from typing import Any

import openai.types as oai
import orjson
import pytest
import text_generation.types as tg
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tokenmill.frontend.outputs import RequestOutput
from tokenmill.loader import default_model_path
from tokenmill.protocol import FinishReason, TokenLogprob
from tokenmill.server import schemas as S
from tokenmill.server.errors import InputValidationError
from tokenmill.server.responses import (
    chat_chunk,
    chat_completion,
    completion,
    completion_chunk,
    error_body,
    generate_response,
    model_list,
    pick_best_of,
    request_error_body,
    simple_tokens,
    stream_error_body,
    stream_event,
    tgi_finish_reason,
    token_bytes,
    usage_chunk,
)
from tokenmill.server.validation import ChatOptions, CompletionOptions, GenerateOptions
from tokenmill.tokenizer import Tokenizer, tokenizer_from_gguf


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizer_from_gguf(default_model_path())


def roundtrip(body: object) -> object:
    """What the client gets: orjson out, JSON in."""
    return orjson.loads(orjson.dumps(body))


def make_out(tok: Tokenizer, prompt: str, text: str, *, finish: FinishReason | None =
             FinishReason.EOS, top: int = 0, logprobs: bool = True, prompt_lps: bool = False,
             seed: int | None = 1234, eos: bool = False) -> RequestOutput:
    """A finished output whose tokens are `text`'s (plus EOS when `eos`)."""
    p_ids = tok.encode(prompt, add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    if eos:
        assert tok.eos_token_id is not None
        ids.append(tok.eos_token_id)
    lps = [TokenLogprob(t, -0.5 - i / 10, [(t, -0.5 - i / 10), (7, -3.0), (8, -4.0)][:top])
           for i, t in enumerate(ids)] if logprobs else None
    plps = ([None] + [TokenLogprob(t, -1.0 - i) for i, t in enumerate(p_ids[1:])]
            if prompt_lps else None)
    return RequestOutput(
        request_id="r", prompt_token_ids=p_ids, text=text, delta=text, token_ids=list(ids),
        new_token_ids=list(ids), finished=finish is not None, finish_reason=finish,
        logprobs=lps, prompt_logprobs=plps, seed=seed)


# ============================================================================ TGI


def test_generate_minimal(tok: Tokenizer) -> None:
    out = make_out(tok, "Hello", " world", logprobs=False)
    body = generate_response(out, tok, GenerateOptions(), "Hello", out.prompt_token_ids)
    assert body == {"generated_text": " world"}
    body = generate_response(out, tok, GenerateOptions(return_full_text=True), "Hello",
                             out.prompt_token_ids)
    assert body["generated_text"] == "Hello world"
    S.GenerateResponse.model_validate(body)


def test_generate_details(tok: Tokenizer) -> None:
    out = make_out(tok, "Hello there", " world!", top=2, prompt_lps=True, eos=True)
    opts = GenerateOptions(details=True, decoder_input_details=True, top_n_tokens=2)
    body = roundtrip(generate_response(out, tok, opts, "Hello there", out.prompt_token_ids))
    assert isinstance(body, dict)
    resp = tg.Response.model_validate(body)  # the text_generation client's type
    S.GenerateResponse.model_validate(body)
    d = body["details"]
    assert d["finish_reason"] == "eos_token" == resp.details.finish_reason.value
    assert d["generated_tokens"] == len(out.token_ids)
    assert d["seed"] == 1234
    assert [t["id"] for t in d["prefill"]] == out.prompt_token_ids
    assert d["prefill"][0]["logprob"] is None and d["prefill"][1]["logprob"] == -1.0
    assert d["prefill"][0]["text"] == "Hello"
    assert [t["id"] for t in d["tokens"]] == out.token_ids
    assert d["tokens"][0] == {"id": out.token_ids[0], "text": " world", "logprob": -0.5,
                              "special": False}
    assert d["tokens"][-1]["special"] is True and d["tokens"][-1]["text"] == "<|im_end|>"
    assert len(d["top_tokens"]) == len(out.token_ids)
    assert [t["id"] for t in d["top_tokens"][0]] == [out.token_ids[0], 7]
    assert "best_of_sequences" not in d


def test_generate_details_variants(tok: Tokenizer) -> None:
    out = make_out(tok, "Hi", " there", finish=FinishReason.STOP)
    opts = GenerateOptions(details=True, sampling=False)
    d = generate_response(out, tok, opts, "Hi", out.prompt_token_ids)["details"]
    assert d["finish_reason"] == "stop_sequence"
    assert d["seed"] is None  # greedy: TGI reports no seed
    assert d["prefill"] == []  # no decoder_input_details
    assert "top_tokens" not in d  # omitted when empty
    tg.Response.model_validate(roundtrip({"generated_text": "x", "details": d}))
    # an aborted output reports length, which every TGI client knows
    out.finish_reason = FinishReason.ABORT
    assert generate_response(out, tok, opts, "Hi", [])["details"]["finish_reason"] == "length"
    assert tgi_finish_reason(None) == "length"
    assert tgi_finish_reason(FinishReason.LENGTH) == "length"


def test_generate_best_of(tok: Tokenizer) -> None:
    a = make_out(tok, "Hi", " a b c")
    b = make_out(tok, "Hi", " x")
    assert a.logprobs is not None and b.logprobs is not None
    a.logprobs = [TokenLogprob(lp.token_id, -5.0) for lp in a.logprobs]
    best, others = pick_best_of([a, b])
    assert best is b and others == [a]
    opts = GenerateOptions(details=True, best_of=2, return_full_text=True)
    body = roundtrip(generate_response(best, tok, opts, "Hi", best.prompt_token_ids, others))
    assert isinstance(body, dict)
    tg.Response.model_validate(body)
    seqs = body["details"]["best_of_sequences"]
    assert len(seqs) == 1 and seqs[0]["generated_text"] == "Hi a b c"
    assert seqs[0]["generated_tokens"] == len(a.token_ids)
    assert body["generated_text"] == "Hi x"


def test_stream_events(tok: Tokenizer) -> None:
    prompt = "Hello"
    opts = GenerateOptions(details=True, top_n_tokens=2, stream=True)
    out = make_out(tok, prompt, " big wide world", top=2, finish=None)
    # First update: two tokens; second update: the last one, finishing.
    ids, lps = list(out.token_ids), list(out.logprobs or [])
    out.token_ids, out.new_token_ids, out.logprobs = ids[:2], ids[:2], lps[:2]
    out.text = tok.decode(ids[:2])
    ev1 = stream_event(out, tok, opts, None, prompt, 1)
    out.token_ids, out.new_token_ids, out.logprobs = ids, ids[2:], lps
    out.text, out.finished, out.finish_reason = " big wide world", True, FinishReason.LENGTH
    ev2 = stream_event(out, tok, opts, None, prompt, 1)
    events = [roundtrip(e) for e in ev1 + ev2]
    assert [e["index"] for e in events] == [1, 2, 3]  # type: ignore[index]
    for e in events:
        tg.StreamResponse.model_validate(e)
        S.StreamResponse.model_validate(e)
    first, last = events[0], events[-1]
    assert isinstance(first, dict) and isinstance(last, dict)
    assert first["generated_text"] is None and first["details"] is None
    assert first["token"] == {"id": ids[0], "text": " big", "logprob": -0.5, "special": False}
    assert [t["id"] for t in first["top_tokens"]] == [ids[0], 7]
    assert last["generated_text"] == " big wide world"
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": 1234,
                               "input_length": 1}
    assert last["token"]["logprob"] == pytest.approx(-0.7)
    # no details asked: details stays null, full text honoured, top_tokens omitted
    opts = GenerateOptions(return_full_text=True, stream=True)
    ev = stream_event(out, tok, opts, 2, prompt, 1)
    assert ev[-1]["details"] is None and ev[-1]["generated_text"] == "Hello big wide world"
    assert ev[-1]["index"] == 3 and "top_tokens" not in ev[-1]
    # a finished update without a token gives no event
    out.new_token_ids = []
    assert stream_event(out, tok, opts, None, prompt, 1) == []


def test_simple_tokens(tok: Tokenizer) -> None:
    text = "héllo <|im_end|> wörld"
    toks = simple_tokens(tok, text)
    assert [t["id"] for t in toks] == tok.encode(text)
    for t in toks:
        S.SimpleToken.model_validate(t)
        assert text[t["start"]:t["stop"]] == t["text"]
    assert "".join(t["text"] for t in toks) == text


def test_token_bytes(tok: Tokenizer) -> None:
    ids = tok.encode("é 😀", add_special_tokens=False)
    raw = b"".join(bytes(token_bytes(tok, i)) for i in ids)
    assert raw.decode("utf-8") == "é 😀"
    eos = tok.eos_token_id
    assert eos is not None
    assert bytes(token_bytes(tok, eos)) == b"<|im_end|>"


# ============================================================================ OpenAI


def test_chat_completion(tok: Tokenizer) -> None:
    outs = [make_out(tok, "p", "Hello there", top=3, eos=True),
            make_out(tok, "p", "Hi", finish=FinishReason.LENGTH),
            make_out(tok, "p", "Yo", finish=FinishReason.STOP)]
    opts = ChatOptions(n=3, logprobs=True, top_logprobs=2)
    body = roundtrip(chat_completion(outs, "smol", 1700000000, "chatcmpl-1", tok, opts, 12,
                                     system_fingerprint="0.1-native"))
    c = ChatCompletion.model_validate(body)
    S.ChatCompletion.model_validate(body)
    assert c.object == "chat.completion" and c.id == "chatcmpl-1" and c.model == "smol"
    assert [ch.finish_reason for ch in c.choices] == ["stop", "length", "stop"]
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == "Hello there"
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
        12, sum(len(o.token_ids) for o in outs), 12 + sum(len(o.token_ids) for o in outs))
    lp = c.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert [e.token for e in lp.content][:2] == ["Hello", " there"]
    assert lp.content[0].bytes == list(b"Hello")
    assert len(lp.content[0].top_logprobs) == 2
    assert lp.content[0].top_logprobs[0].token == "Hello"
    # no logprobs asked
    body = chat_completion(outs[:1], "smol", 0, "x", tok, ChatOptions(), 1)
    assert body["choices"][0]["logprobs"] is None
    ChatCompletion.model_validate(body)


def test_chat_chunks(tok: Tokenizer) -> None:
    opts = ChatOptions(logprobs=True, top_logprobs=1, stream=True, include_usage=True)
    out = make_out(tok, "p", "Hello there", top=1, finish=None)
    ids, lps = list(out.token_ids), list(out.logprobs or [])
    out.token_ids, out.new_token_ids, out.logprobs, out.delta = ids[:1], ids[:1], lps[:1], "Hello"
    c1 = roundtrip(chat_chunk(out, "smol", 1, "id", tok, opts, first=True))
    out.token_ids, out.new_token_ids, out.logprobs, out.delta = ids, ids[1:], lps, " there"
    out.finished, out.finish_reason = True, FinishReason.EOS
    c2 = roundtrip(chat_chunk(out, "smol", 1, "id", tok, opts, index=0))
    u = roundtrip(usage_chunk("chat.completion.chunk", "smol", 1, "id", 3, 2))
    chunks = [ChatCompletionChunk.model_validate(c) for c in (c1, c2, u)]
    for c in (c1, c2, u):
        S.ChatCompletionChunk.model_validate(c)
    a, b, last = chunks
    assert a.object == "chat.completion.chunk"
    assert a.choices[0].delta.role == "assistant" and a.choices[0].delta.content == "Hello"
    assert a.choices[0].finish_reason is None and a.usage is None
    assert a.choices[0].logprobs is not None and a.choices[0].logprobs.content is not None
    assert [e.token for e in a.choices[0].logprobs.content] == ["Hello"]
    assert b.choices[0].delta.role is None and b.choices[0].delta.content == " there"
    assert b.choices[0].finish_reason == "stop"
    assert b.choices[0].logprobs is not None and b.choices[0].logprobs.content is not None
    assert [e.token for e in b.choices[0].logprobs.content] == [" there"]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == 5


def _strip_echo_nulls(body: object) -> object:
    """`body` with the echoed first prompt token's null logprob replaced by 0.0 / {}."""
    import copy

    body = copy.deepcopy(body)
    assert isinstance(body, dict)
    for ch in body["choices"]:
        lp = ch["logprobs"]
        if lp:
            lp["token_logprobs"] = [0.0 if v is None else v for v in lp["token_logprobs"]]
            lp["top_logprobs"] = [{} if v is None else v for v in lp["top_logprobs"]]
    return body


def test_completion(tok: Tokenizer) -> None:
    outs = [make_out(tok, "Say", " hi", top=2, prompt_lps=True, finish=FinishReason.LENGTH),
            make_out(tok, "Say", " yo", finish=FinishReason.EOS)]
    opts = CompletionOptions(n=2, logprobs=2, echo=True)
    body = roundtrip(completion(outs, "smol", 5, "cmpl-1", tok, opts, 1,
                                prompt_texts=["Say", "Say"]))
    # With echo, the first prompt token has no logprob: null, as OpenAI's API sends it. The
    # openai client's types say list[float] (the client builds responses without validating),
    # so validate with our schema, and with the client's type once those nulls are filled.
    S.Completion.model_validate(body)
    c = oai.Completion.model_validate(_strip_echo_nulls(body))
    assert c.object == "text_completion"
    assert [ch.text for ch in c.choices] == ["Say hi", "Say yo"]
    assert [ch.finish_reason for ch in c.choices] == ["length", "stop"]
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens == ["Say", " hi"]
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.5]  # type: ignore[index]
    assert body["choices"][0]["logprobs"]["top_logprobs"] == [  # type: ignore[index]
        None, {" hi": -0.5, tok.id_to_token(7): -3.0}]
    assert lp.text_offset == [0, 3]
    assert c.usage is not None
    assert c.usage.completion_tokens == sum(len(o.token_ids) for o in outs)
    # no echo, no logprobs; echo without prompt_texts decodes the ids
    body = completion(outs[:1], "smol", 5, "x", tok, CompletionOptions(), 1)
    assert body["choices"][0]["text"] == " hi" and body["choices"][0]["logprobs"] is None
    body = completion(outs[:1], "smol", 5, "x", tok, CompletionOptions(echo=True), 1)
    assert body["choices"][0]["text"] == "Say hi"


def test_completion_chunks(tok: Tokenizer) -> None:
    out = make_out(tok, "Say", " hi", top=1, prompt_lps=True, finish=FinishReason.LENGTH)
    opts = CompletionOptions(logprobs=1, echo=True, stream=True)
    chunk = roundtrip(completion_chunk(out, "smol", 5, "c", tok, opts, index=1, prefix="Say"))
    S.Completion.model_validate(chunk)
    c = oai.Completion.model_validate(_strip_echo_nulls(chunk))
    assert c.choices[0].text == "Say hi" and c.choices[0].index == 1
    assert c.choices[0].finish_reason == "length"
    assert c.choices[0].logprobs is not None and c.choices[0].logprobs.tokens == ["Say", " hi"]
    out.finished, out.finish_reason = False, None
    chunk = completion_chunk(out, "smol", 5, "c", tok, CompletionOptions(), text_offset=3)
    # Intermediate chunks have finish_reason null, as OpenAI streams them (the client's type
    # says otherwise, but it does not validate stream chunks).
    assert chunk["choices"][0]["finish_reason"] is None and chunk["usage"] is None
    S.Completion.model_validate(chunk)
    assert chunk["choices"][0]["text"] == " hi"
    u = usage_chunk("text_completion", "smol", 5, "c", 2, 3)
    assert oai.Completion.model_validate(u).usage is not None and u["choices"] == []


def test_logprob_infinity_is_json_safe(tok: Tokenizer) -> None:
    out = make_out(tok, "p", "Hi")
    assert out.logprobs is not None
    out.logprobs[0] = TokenLogprob(out.logprobs[0].token_id, -math.inf, [(1, -math.inf)])
    body = roundtrip(chat_completion([out], "m", 0, "x", tok,
                                     ChatOptions(logprobs=True, top_logprobs=1), 1))
    c = ChatCompletion.model_validate(body)
    assert c.choices[0].logprobs is not None and c.choices[0].logprobs.content is not None
    assert c.choices[0].logprobs.content[0].logprob == -9999.0


def test_model_list() -> None:
    body = model_list("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert body == {"object": "list", "data": [{
        "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "object": "model", "created": 0,
        "owned_by": "HuggingFaceTB/SmolLM2-135M-Instruct"}]}
    page = oai.Model.model_validate(body["data"][0])
    assert page.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    S.ModelList.model_validate(model_list(["a", "b"], owned_by="me"))


def test_error_bodies() -> None:
    err = InputValidationError("`inputs` cannot be empty")
    tgi = request_error_body(err, openai=False)
    assert tgi == {"error": "Input validation error: `inputs` cannot be empty",
                   "error_type": "validation"}
    S.ErrorResponse.model_validate(tgi)
    body = request_error_body(err, openai=True)
    S.OpenAIErrorResponse.model_validate(body)
    assert body["error"]["message"] == tgi["error"] and body["error_type"] == "validation"
    assert error_body(429, "Model is overloaded", "overloaded", False) == {
        "error": "Model is overloaded", "error_type": "overloaded"}
    ev = stream_error_body(422, "x", "validation", True)
    assert ev["error"]["http_status_code"] == 422
    assert stream_error_body(424, "y", "generation", False) == {
        "error": "y", "error_type": "generation"}


def test_error_bodies_with_clients() -> None:
    """The openai client shows our message and type; text_generation raises the right error."""
    import openai

    httpx = pytest.importorskip("httpx2")  # the HTTP library this openai client is built on
    from text_generation.errors import ValidationError as TgValidationError
    from text_generation.errors import parse_error

    msg = "Input validation error: `top_p` must be > 0.0 and < 1.0"
    tgi = error_body(422, msg, "validation", False)
    assert isinstance(parse_error(422, tgi), TgValidationError)

    body = error_body(422, msg, "validation", True)

    def handler(request: Any) -> Any:
        return httpx.Response(422, json=body)

    http_client = openai.DefaultHttpxClient(transport=httpx.MockTransport(handler))
    client = openai.OpenAI(api_key="x", base_url="http://test/v1", http_client=http_client,
                           max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as ei:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert msg in str(ei.value)
    assert ei.value.type == "validation"
