"""The `tokenmill` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tokenmill.bench.cli import add_bench_parser
from tokenmill.config import QUANTIZE_CHOICES
from tokenmill.watermark.cli import add_watermark_parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model-id", default=_env_default("--model-id", str, None),
                   help="local folder, .gguf file or Hub id (default: embedded SmolLM2-135M)")
    g.add_argument("--revision", default=_env_default("--revision", str, None))
    g.add_argument("--dtype", default=_env_default("--dtype", str, "auto"),
                   choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default=_env_default("--device", str, "auto"))
    g.add_argument("--quantize", default=_env_default("--quantize", str, None),
                   choices=list(QUANTIZE_CHOICES),
                   help="quantization of the linear layers at load (CPU). Default: as the "
                        "checkpoint is (a GGUF with 4-bit Q4_0/Q4_1 weights runs them as "
                        "w4a8, as llama.cpp would; other checkpoints as loaded). none: the "
                        "weights as loaded, in --dtype; int4: weights in groups of 32 (exact "
                        "for Q4_0/Q4_1 GGUF weights), bf16 activations; w4a8: the same "
                        "weights, activations rounded to int8 per group of 32 as llama.cpp "
                        "does (native kernel, the fastest)")
    g.add_argument("--load-format", default=_env_default("--load-format", str, "auto"),
                   choices=["auto", "dummy"],
                   help="dummy: random weights of the model's shapes, nothing read but "
                        "config.json and the tokenizer (for benchmarks)")
    g.add_argument("--cuda-graphs", type=_batch_sizes,
                   default=_env_default("--cuda-graphs", _batch_sizes, [1, 2, 4, 8, 16, 32, 64, 128]),
                   help="decode batch sizes recorded as CUDA graphs, comma-separated; 0: none "
                        "(CUDA with the Triton attention backend)")
    g.add_argument("--max-batch-total-tokens", type=int,
                   default=_env_default("--max-batch-total-tokens", int, None),
                   help="KV cache size in tokens (default: a fraction of free memory)")
    g.add_argument("--max-batch-prefill-tokens", type=int,
                   default=_env_default("--max-batch-prefill-tokens", int, 2048),
                   help="token budget of one forward pass")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-dtype", default=_env_default("--kv-cache-dtype", str, "auto"),
                   help="auto: the model's dtype; int8: K and V rounded to int8 per "
                        "group of 32 as llama.cpp's q8_0 cache, half the memory and faster "
                        "attention, slightly less exact; fp8_e4m3fn (or fp8), fp8_e5m2: "
                        "TGI's float8 caches, half the memory on CUDA (CPU: torch path)")
    g.add_argument("--lora-adapters", default=_env_default("--lora-adapters", str, None),
                   help="comma-separated LoRA adapters loaded at start: name=path_or_hub_id, "
                        "a path, or a Hub id[@revision]")
    g.add_argument("--max-active-adapters", type=int,
                   default=_env_default("--max-active-adapters", int, 32),
                   help="LoRA adapters on the device at once; the rest wait in host memory "
                        "and are swapped in least-recently-used first")
    g.add_argument("--watermark-gamma", type=float,
                   default=_env_default("--watermark-gamma", float, 0.5),
                   help="watermark: green fraction of the vocabulary, in (0, 1)")
    g.add_argument("--watermark-delta", type=float,
                   default=_env_default("--watermark-delta", float, 2.0),
                   help="watermark: bias added to green logits, >= 0")


def _engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(model_id=a.model_id, revision=a.revision, dtype=a.dtype, device=a.device,
                quantize=a.quantize, load_format=a.load_format,
                cuda_graphs=a.cuda_graphs,
                max_batch_total_tokens=a.max_batch_total_tokens,
                max_batch_prefill_tokens=a.max_batch_prefill_tokens, block_size=a.block_size,
                kv_cache_dtype=a.kv_cache_dtype,
                lora_adapters=[s.strip() for s in (a.lora_adapters or "").split(",")
                               if s.strip()],
                max_active_adapters=a.max_active_adapters,
                watermark_gamma=a.watermark_gamma, watermark_delta=a.watermark_delta)


def cmd_generate(a: argparse.Namespace) -> int:
    from tokenmill.llm import LLM
    from tokenmill.loader import ModelLoadError
    from tokenmill.protocol import SamplingParams

    try:
        llm = LLM(**_engine_kwargs(a))
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                            top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop=a.stop or [],
                            watermark=a.watermark)
    tok = llm.tokenizer
    if a.raw or tok.chat_template is None:
        prompt: str | list[int] = a.prompt
    else:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}])
        prompt = tok.encode(text, add_special_tokens=False)
    rid = llm.engine.add_request(prompt, params)
    while llm.engine.has_unfinished:
        for out in llm.engine.step():
            if out.request_id == rid:
                sys.stdout.write(out.delta)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# TGI launcher flags: (flag, type, default, help). Each also reads its UPPER_SNAKE env var.
_SERVE_FLAGS: list[tuple[str, Any, Any, str]] = [
    ("--hostname", str, "0.0.0.0", "address to listen on"),
    ("--port", int, 3000, "port to listen on"),
    ("--api-key", str, None, "require `Authorization: Bearer KEY` (not on /health, /metrics)"),
    ("--cors-allow-origin", str, None, "comma-separated allowed CORS origins"),
    ("--payload-limit", int, 2_000_000, "largest request body in bytes (413 past it)"),
    ("--max-concurrent-requests", int, 128, "requests served at once (429 past it)"),
    ("--max-best-of", int, 2, "largest best_of"),
    ("--max-stop-sequences", int, 4, "most stop sequences per request"),
    ("--max-top-n-tokens", int, 5, "largest top_n_tokens / top_logprobs"),
    ("--max-input-tokens", int, None, "longest prompt (default: max-total-tokens - 1)"),
    ("--max-total-tokens", int, None, "prompt + new tokens (default: the model's length)"),
    ("--max-client-batch-size", int, 4, "most prompts in one /v1/completions request"),
    ("--graceful-termination-timeout", float, 90.0, "seconds streams may run after SIGTERM"),
    ("--lora-dynamic-dir", str, None,
     "comma-separated folders of LoRA adapters that may be loaded at run time: by "
     "POST /v1/load_lora_adapter, or on first use of an adapter id naming a sub-folder"),
]


def _batch_sizes(text: str) -> list[int]:
    """`--cuda-graphs`: comma-separated batch sizes >= 0 (TGI's "0": none)."""
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of batch sizes: {text!r}") from None
    if any(b < 0 or b > 4096 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be in 0..4096: {text!r}")
    return sizes


def _env_default(flag: str, kind: Any, default: Any) -> Any:
    import os

    raw = os.environ.get(flag.lstrip("-").replace("-", "_").upper())
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return kind(raw)


def _host_default() -> str:
    # HOSTNAME is set by shells to the machine's name; TGI's images set it to an address.
    # Honour it only when it is an address.
    import ipaddress
    import os

    raw = os.environ.get("HOSTNAME", "")
    try:
        ipaddress.ip_address(raw)
        return raw
    except ValueError:
        return "0.0.0.0"


def cmd_serve(a: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig, ServerConfig
    from tokenmill.server.launcher import run_server

    if a.max_input_length is not None:
        if a.max_input_tokens is not None:
            print("error: give --max-input-tokens or --max-input-length, not both",
                  file=sys.stderr)
            return 2
        a.max_input_tokens = a.max_input_length
    try:
        engine = EngineConfig.from_kwargs(**_engine_kwargs(a), max_num_seqs=a.max_batch_size)
        server = ServerConfig(
            hostname=a.hostname, port=a.port, api_key=a.api_key,
            cors_allow_origin=[o.strip() for o in (a.cors_allow_origin or "").split(",")
                               if o.strip()],
            payload_limit=a.payload_limit, max_concurrent_requests=a.max_concurrent_requests,
            max_best_of=a.max_best_of, max_stop_sequences=a.max_stop_sequences,
            max_top_n_tokens=a.max_top_n_tokens, max_input_tokens=a.max_input_tokens,
            max_total_tokens=a.max_total_tokens, max_client_batch_size=a.max_client_batch_size,
            json_output=a.json_output,
            graceful_termination_timeout=a.graceful_termination_timeout,
            engine_mode=a.engine_mode,
            lora_dynamic_dirs=[d.strip() for d in (a.lora_dynamic_dir or "").split(",")
                               if d.strip()])
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_server(engine, server)


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults of `serve` flags come from their env vars when set."""
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="print a completion of one prompt")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--watermark", action="store_true",
                   help="watermark the output (see `tokenmill watermark detect`)")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)
    for name in ("serve", "launch"):
        sp = sub.add_parser(name, help="run the HTTP server (TGI and OpenAI APIs)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _engine_args(sp)
        for flag, kind, default, help_ in _SERVE_FLAGS:
            default = (_host_default() if flag == "--hostname"
                       else _env_default(flag, kind, default))
            sp.add_argument(flag, type=kind, default=default, help=help_)
        sp.add_argument("--max-input-length", type=int,
                        default=_env_default("--max-input-length", int, None),
                        help="legacy name of --max-input-tokens")
        sp.add_argument("--max-batch-size", type=int,
                        default=_env_default("--max-batch-size", int, 256),
                        help="most sequences in the running batch")
        sp.add_argument("--json-output", action="store_true",
                        default=_env_default("--json-output", bool, False),
                        help="structured JSON logs")
        sp.add_argument("--engine-mode", choices=["process", "thread"], default="process",
                        help="run the engine in its own process (default) or a thread")
        sp.set_defaults(func=cmd_serve)
    add_bench_parser(sub)  # `tokenmill bench`: sets func=run_bench
    add_watermark_parser(sub)  # `tokenmill watermark detect`
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
