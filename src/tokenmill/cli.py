"""The `tokenmill` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model-id", default=None,
                   help="local folder, .gguf file or Hub id (default: embedded SmolLM2-135M)")
    g.add_argument("--revision", default=None)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto")
    g.add_argument("--max-batch-total-tokens", type=int, default=None)
    g.add_argument("--max-batch-prefill-tokens", type=int, default=2048)
    g.add_argument("--block-size", type=int, default=16)


def _engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(model_id=a.model_id, revision=a.revision, dtype=a.dtype, device=a.device,
                max_batch_total_tokens=a.max_batch_total_tokens,
                max_batch_prefill_tokens=a.max_batch_prefill_tokens, block_size=a.block_size)


def cmd_generate(a: argparse.Namespace) -> int:
    from tokenmill.llm import LLM
    from tokenmill.loader import ModelLoadError
    from tokenmill.protocol import SamplingParams

    try:
        llm = LLM(**_engine_kwargs(a))
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                            top_p=a.top_p, top_k=a.top_k, seed=a.seed, stop=a.stop or [])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
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
    _engine_args(g)
    g.set_defaults(func=cmd_generate)
    a = parser.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
