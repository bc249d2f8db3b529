"""GPU speed (issue 7): the batch-1 decode step against the memory roofline, and offline
throughput from 1 to 256 concurrent requests, for a Llama-3-8B-shaped model with random
bfloat16 weights (`load_format="dummy"`: nothing to download) and for SmolLM2-135M.

    .venv/bin/python benchmarks/gpu_decode.py                    # on a CUDA machine
    .venv/bin/python benchmarks/gpu_decode.py --json gpu.json
    .venv/bin/python benchmarks/gpu_decode.py --device cpu --shapes tiny --concurrency 1,4 \
        --new-tokens 4                                           # the smoke test's run

Roofline: a decode step reads every weight once, so its floor is the weight bytes over the
device's copy bandwidth, measured here as a 1 GiB device-to-device copy reports it (bytes read
plus bytes written, per second). The script prints the device, that bandwidth and a markdown
table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.llm import LLM
from tokenmill.protocol import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_throughput import bench_tokenmill_decode  # a sibling script

# Hugging Face config.json fields of each random-weight shape ("smollm2" is the embedded
# model with its real weights).
SHAPES: dict[str, dict[str, Any] | None] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "smollm2": None,
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                 rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy (best of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def shape_folder(name: str, root: Path) -> Path:
    """config.json of a random-weight shape, with SmolLM2's tokenizer (transformers saves it)."""
    import transformers

    from tokenmill.loader import default_model_path

    fields = SHAPES[name]
    assert fields is not None
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    gguf = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(path)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", **fields)
    (path / "config.json").write_text(json.dumps(config))
    return path


def weight_bytes(llm: LLM) -> int:
    model = llm.model
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied embeddings once
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def decode_step_ms(llm: LLM, new_tokens: int, vocab: int) -> float:
    """Mean wall time of a batch-1 decode step (the steps after the first token)."""
    return 1000 / bench_tokenmill_decode(llm, prompts(1, 32, vocab, 0)[0], new_tokens)


def throughput(llm: LLM, n: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    """Output tokens per second for n requests at once (fixed lengths, greedy)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ps = prompts(n, prompt_len, vocab, n)
    t0 = time.perf_counter()
    outs = llm.generate(ps, params)
    dt = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return n * new_tokens / dt


def run_shape(name: str, device: torch.device, bw: float, args: argparse.Namespace,
              root: Path) -> dict[str, Any]:
    kw: dict[str, Any] = dict(dtype="bfloat16", device=str(device))
    if args.max_batch_total_tokens:
        kw["max_batch_total_tokens"] = args.max_batch_total_tokens
    if SHAPES[name] is None:
        llm = LLM(**kw)
    else:
        llm = LLM(str(shape_folder(name, root)), load_format="dummy", **kw)
    vocab = len(llm.tokenizer)
    wbytes = weight_bytes(llm)
    throughput(llm, 2, 16, 4, vocab)  # warm-up: kernels compiled, caches touched
    step = decode_step_ms(llm, args.decode_tokens, vocab)
    roof = wbytes / bw * 1000
    r: dict[str, Any] = {"shape": name, "weight_bytes": wbytes, "decode_step_ms": step,
                         "roofline_ms": roof, "ratio": step / roof, "throughput": {}}
    for n in args.concurrency:
        r["throughput"][n] = throughput(llm, n, args.prompt_tokens, args.new_tokens, vocab)
        print(f"  {name}: {n:>4} concurrent: {r['throughput'][n]:10.1f} tok/s", flush=True)
    del llm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def table(results: list[dict[str, Any]], concurrency: list[int]) -> str:
    head = ("| model | weights | batch-1 step | roofline | ratio | "
            + " | ".join(f"c={n} tok/s" for n in concurrency) + " |")
    rows = [head, "|" + "---|" * (5 + len(concurrency))]
    for r in results:
        rows.append(f"| {r['shape']} | {r['weight_bytes'] / 2**30:.2f} GiB | "
                    f"{r['decode_step_ms']:.2f} ms | {r['roofline_ms']:.2f} ms | "
                    f"{r['ratio']:.2f}x | "
                    + " | ".join(f"{r['throughput'][n]:.0f}" for n in concurrency) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="llama3-8b,smollm2")
    ap.add_argument("--concurrency", default="1,8,32,64,128,256")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=129)
    ap.add_argument("--max-batch-total-tokens", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for a smoke run)")
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bw = copy_bandwidth(device)
    print(f"device: {what}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write); "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.shapes.split(","):
            results.append(run_shape(s, device, bw, args, Path(tmp)))
            if args.json:  # after each shape: a run cut short by a time limit keeps them
                args.json.write_text(json.dumps({"device": what, "copy_bandwidth": bw,
                                                 "results": results}, indent=1))
    print(table(results, args.concurrency))


if __name__ == "__main__":
    main()
