"""Launcher flags: TGI's names, each also read from its UPPER_SNAKE environment variable."""

from __future__ import annotations

import pytest

from tokenmill.cli import build_parser


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_flags_and_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    a = parse()
    assert (a.port, a.max_concurrent_requests, a.payload_limit, a.hostname) == (
        3000, 128, 2_000_000, "0.0.0.0")
    monkeypatch.setenv("PORT", "8081")
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "7")
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "4096")
    monkeypatch.setenv("MODEL_ID", "org/model")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("JSON_OUTPUT", "true")
    a = parse()
    assert (a.port, a.max_concurrent_requests, a.max_total_tokens, a.model_id, a.api_key,
            a.json_output) == (8081, 7, 4096, "org/model", "k", True)
    assert parse("--port", "9000").port == 9000  # a flag beats its env var


def test_hostname_env_only_when_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTNAME", "build-machine-42")  # what shells set: not an address
    assert parse().hostname == "0.0.0.0"
    monkeypatch.setenv("HOSTNAME", "127.0.0.1")
    assert parse().hostname == "127.0.0.1"


def test_launch_alias_and_legacy_input_length() -> None:
    a = build_parser().parse_args(["launch", "--max-input-length", "100"])
    assert a.max_input_length == 100


def test_quantize_flag_reaches_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.cli import _engine_kwargs
    from tokenmill.config import EngineConfig

    assert EngineConfig.from_kwargs(**_engine_kwargs(parse())).model.quantize is None
    cfg = EngineConfig.from_kwargs(**_engine_kwargs(parse("--quantize", "int4")))
    assert cfg.model.quantize == "int4"
    cfg = EngineConfig.from_kwargs(**_engine_kwargs(parse("--quantize", "none")))
    assert cfg.model.quantize == "none"  # the GGUF's 4-bit weights dequantized, not w4a8
    monkeypatch.setenv("QUANTIZE", "int4")
    assert parse().quantize == "int4"
    with pytest.raises(SystemExit):
        parse("--quantize", "fp8")


def test_cuda_graphs_and_load_format_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.cli import _engine_kwargs
    from tokenmill.config import EngineConfig

    cfg = EngineConfig.from_kwargs(**_engine_kwargs(parse()))
    assert cfg.model.cuda_graphs == [1, 2, 4, 8, 16, 32, 64, 128]
    assert cfg.model.load_format == "auto"
    cfg = EngineConfig.from_kwargs(**_engine_kwargs(parse("--cuda-graphs", "0",
                                                          "--load-format", "dummy")))
    assert cfg.model.cuda_graphs == [0] and cfg.model.load_format == "dummy"
    monkeypatch.setenv("CUDA_GRAPHS", "1,2,4")  # TGI's env var
    assert parse().cuda_graphs == [1, 2, 4]
    for bad in ("1,x", "-1", "99999"):
        with pytest.raises(SystemExit):
            parse("--cuda-graphs", bad)
    with pytest.raises(SystemExit):
        parse("--load-format", "pt")


def test_kv_cache_dtype_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.cli import _engine_kwargs
    from tokenmill.config import EngineConfig

    assert EngineConfig.from_kwargs(**_engine_kwargs(parse())).cache.kv_cache_dtype == "auto"
    cfg = EngineConfig.from_kwargs(**_engine_kwargs(parse("--kv-cache-dtype", "int8")))
    assert cfg.cache.kv_cache_dtype == "int8"
    monkeypatch.setenv("KV_CACHE_DTYPE", "int8")  # TGI's env var
    assert parse().kv_cache_dtype == "int8"
    # TGI's fp8 values, and vLLM's spellings of e4m3
    for flag, want in (("fp8_e5m2", "fp8_e5m2"), ("fp8_e4m3fn", "fp8_e4m3fn"),
                       ("fp8", "fp8_e4m3fn"), ("fp8_e4m3", "fp8_e4m3fn")):
        cfg = EngineConfig.from_kwargs(**_engine_kwargs(parse("--kv-cache-dtype", flag)))
        assert cfg.cache.kv_cache_dtype == want
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        EngineConfig.from_kwargs(**_engine_kwargs(parse("--kv-cache-dtype", "int4")))
