"""The wire protocol: every message survives a msgspec msgpack round trip, and nothing pickles."""

from __future__ import annotations

import msgspec
import pytest

from tokenmill.config import EngineConfig
from tokenmill.ipc import (
    AbortRequests,
    AddRequest,
    EngineInfo,
    EngineStats,
    Fatal,
    FromEngineDecoder,
    FromEngineEncoder,
    Outputs,
    Ping,
    Pong,
    Ready,
    RequestFailed,
    Shutdown,
    ToEngineDecoder,
    ToEngineEncoder,
)
from tokenmill.protocol import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingParams,
    TokenLogprob,
)

STATS = EngineStats(num_running=2, num_waiting=1, num_kv_blocks=512, num_free_kv_blocks=500,
                    prefix_queries=100, prefix_hits=32, num_preemptions=1, num_steps=7,
                    last_batch_tokens=40, last_batch_size=2)
INFO = EngineInfo(model_id="m", max_model_len=8192, vocab_size=49152, dtype="float32",
                  device="cpu", num_kv_blocks=512, block_size=16,
                  attention_backend="torch-sdpa", pid=1234)
REQUEST = EngineRequest(
    request_id="r1", prompt_token_ids=[1, 2, 3],
    params=SamplingParams(max_new_tokens=5, temperature=0.5, stop=["x"], seed=2**63 + 5,
                          logprobs=2),
    eos_token_ids=[2], adapter_id="a", arrival_time=1.5)
OUTPUT = EngineOutput(
    request_id="r1", new_token_ids=[7], finish_reason=FinishReason.STOP,
    logprobs=[TokenLogprob(7, -0.25, [(7, -0.25), (9, -2.0)])],
    prompt_logprobs=[None, TokenLogprob(2, -1.0)], num_cached_tokens=16, seed=42)

TO_ENGINE = [AddRequest(REQUEST), AbortRequests(["a", "b"]), Ping(2**40), Shutdown()]
FROM_ENGINE = [Ready(INFO), Outputs([OUTPUT, EngineOutput(request_id="r2", new_token_ids=[])],
                                    STATS),
               Pong(3, STATS), RequestFailed("r1", "too long"), Fatal("boom"),
               Fatal("x.gguf: truncated", load_error=True)]


@pytest.mark.parametrize("msg", TO_ENGINE, ids=lambda m: type(m).__name__)
def test_to_engine_round_trip(msg: object) -> None:
    data = ToEngineEncoder().encode(msg)  # type: ignore[arg-type]
    assert ToEngineDecoder().decode(data) == msg
    assert b"pickle" not in data and not data.startswith(b"\x80")  # msgpack, not a pickle


@pytest.mark.parametrize("msg", FROM_ENGINE, ids=lambda m: type(m).__name__)
def test_from_engine_round_trip(msg: object) -> None:
    data = FromEngineEncoder().encode(msg)  # type: ignore[arg-type]
    assert FromEngineDecoder().decode(data) == msg


def test_directions_do_not_mix_and_garbage_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        ToEngineDecoder().decode(FromEngineEncoder().encode(Fatal("x")))
    with pytest.raises(msgspec.DecodeError):
        FromEngineDecoder().decode(ToEngineEncoder().encode(Ping(1)))
    for junk in (b"", b"\xc1", b"garbage", msgspec.msgpack.encode(["add", {"no": 1}]),
                 msgspec.msgpack.encode(["explode"]), msgspec.msgpack.encode({"a": 1})):
        with pytest.raises(msgspec.DecodeError):
            ToEngineDecoder().decode(junk)


def test_frames_are_tagged_arrays() -> None:
    assert msgspec.msgpack.decode(ToEngineEncoder().encode(Ping(5))) == ["ping", 5]
    assert msgspec.msgpack.decode(ToEngineEncoder().encode(Shutdown())) == ["shutdown"]


def test_engine_config_json_round_trip() -> None:
    cfg = EngineConfig.from_kwargs(model_id="/x/y.gguf", dtype="float32", block_size=32,
                                   max_batch_total_tokens=4096, max_num_seqs=8)
    assert msgspec.json.decode(msgspec.json.encode(cfg), type=EngineConfig) == cfg
    bad = msgspec.json.encode(cfg).replace(b"float32", b"float99")
    with pytest.raises(msgspec.ValidationError, match="float99"):  # __post_init__ runs
        msgspec.json.decode(bad, type=EngineConfig)
