"""The fused stack (models/fused_stack.py: w4a8 or dense weights on CPU): prefill, chunked prefill
mixed with decodes, and decode steps through the one native call give the layer-by-layer
path's logits and KV cache bit for bit, with attention bias (Qwen2) and a sliding window
(Mistral), over the model's dtype or the int8 KV cache; the steps it must not take go the
layer-by-layer way."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionMetadata, TorchPagedAttention
from tokenmill.layers.quant import W4A8Weight
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.runner.loading import load_model

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: no native kernels, no w4a8 stack")

BLOCK, BLOCKS = 4, 60


def _model(arch: str, dtype: str, path: Path, quantize: str = "w4a8",
           kv: str = "auto") -> LlamaForCausalLM:
    """A tiny model (w4a8, or `quantize` "none": dense tiles) with its cache bound: the
    model's dtype, or int8 (`kv`), whose layout needs a head dim of 32 and blocks of 16."""
    pytest.importorskip("transformers")
    from models.test_model_parity import make_tiny

    make_tiny(arch, path, **({"head_dim": 32} if kv == "int8" else {}))
    model = load_model(ModelConfig(model_id=str(path), dtype=dtype, quantize=quantize)).model
    kv_dtype = torch.int8 if kv == "int8" else model.embed_tokens.weight.dtype
    model.block_size = 16 if kv == "int8" else BLOCK  # type: ignore[attr-defined]
    model.kv_cache = torch.zeros(  # type: ignore[attr-defined]
        model.kv_cache_shape(BLOCKS, model.block_size, kv_dtype),  # type: ignore[attr-defined]
        dtype=kv_dtype)
    model.bind_kv_cache(model.kv_cache)  # type: ignore[attr-defined]
    return model


def _meta(model: LlamaForCausalLM, qlens: list[int], ctxs: list[int],
          tables: list[list[int]]) -> AttentionMetadata:
    return TorchPagedAttention().build_metadata(qlens, ctxs, tables,
                                                model.block_size,  # type: ignore[attr-defined]
                                                model.cfg.sliding_window, torch.device("cpu"))


def _forward(model: LlamaForCausalLM, ids: list[int], pos: list[int], meta: AttentionMetadata,
             out_rows: list[int] | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), meta, out_rows))


@pytest.mark.parametrize("quantize", ["w4a8", "none"])
@pytest.mark.parametrize("dtype,kv", [("float32", "auto"), ("bfloat16", "auto"),
                                      ("bfloat16", "int8")])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_step_equals_layer_by_layer(arch: str, dtype: str, kv: str, quantize: str,
                                          tmp_path: Path) -> None:
    model = _model(arch, dtype, tmp_path, quantize, kv)
    stack = model.fused_stack
    assert stack is not None and stack.w4a8 == (quantize == "w4a8")
    cache = model.kv_cache  # type: ignore[attr-defined]  # every layer's

    def both(ids: list[int], pos: list[int], meta: AttentionMetadata) -> torch.Tensor:
        """The step through the fused stack, then again layer by layer from the same cache:
        the same kernels in the same order (the layers call them too), so the same bits."""
        assert stack.takes(len(ids), meta)
        before = cache.clone()
        fused = _forward(model, ids, pos, meta)
        after_fused = cache.clone()
        cache.copy_(before)
        model.fused_stack = None
        plain = _forward(model, ids, pos, meta)
        model.fused_stack = stack
        assert not torch.equal(after_fused, before)  # the step wrote its keys and values
        assert torch.equal(after_fused, cache)
        assert torch.equal(fused, plain)
        # Only some rows' outputs (a prefill's last row, a prompt-logprobs span, none): the
        # same bits for those rows and the same cache, on both paths.
        n = len(ids)
        for keep in ([n - 1], sorted(random.Random(n).sample(range(n), max(1, n // 2))), []):
            for fused_path in (True, False):
                cache.copy_(before)
                model.fused_stack = stack if fused_path else None
                some = _forward(model, ids, pos, meta, keep)
                assert torch.equal(cache, after_fused)
                assert torch.equal(some, fused[keep]), (keep, fused_path)
        model.fused_stack = stack
        return fused

    blocks = random.Random(0).sample(range(BLOCKS), BLOCKS)
    tables = [blocks[0:20], blocks[20:40], blocks[40:60]]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (11, 6, 17)]
    # Two prefills on their own, the third (in two chunks) mixed with decodes of the others.
    last = []
    for prompt, table in zip(prompts[:2], tables):
        n = len(prompt)
        last.append(int(both(prompt, list(range(n)), _meta(model, [n], [n], [table]))[-1]
                        .argmax()))
    third = prompts[2]
    both(third[:9], list(range(9)), _meta(model, [9], [9], [tables[2]]))
    ctxs = [len(prompts[0]), len(prompts[1])]
    mixed = _meta(model, [1, 1, 8], [ctxs[0] + 1, ctxs[1] + 1, 17], tables)
    logits = both(last + third[9:], ctxs + list(range(9, 17)), mixed)
    last = logits[[0, 1, -1]].argmax(-1).tolist()
    ctxs = [ctxs[0] + 1, ctxs[1] + 1, 17]
    for _ in range(6):  # decode steps of all three sequences
        meta = _meta(model, [1, 1, 1], [c + 1 for c in ctxs], tables)
        last = both(last, ctxs, meta).argmax(-1).tolist()
        ctxs = [c + 1 for c in ctxs]


def test_steps_it_does_not_take(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W4A8Weight, "max_rows", 4)
    model = _model("llama", "float32", tmp_path)
    stack = model.fused_stack
    assert stack is not None
    assert stack.takes(3, _meta(model, [3], [3], [[0]]))  # a prefill
    assert stack.takes(3, _meta(model, [1, 2], [5, 6], [[0, 1], [2, 3]]))
    gpu_like = _meta(model, [1], [3], [[0]])
    gpu_like.rows = None  # what a CUDA step's metadata has
    assert not stack.takes(1, gpu_like)
    many = W4A8Weight.max_rows + 1
    wide = _meta(model, [1] * many, [2] * many, [[i] for i in range(many)])
    assert not stack.takes(many, wide)  # more rows than the kernels' regime
    decode = _meta(model, [1], [3], [[0]])
    assert stack.takes(1, decode)
    from tokenmill.lora.manager import LoraManager

    lora = LoraManager(model, torch.device("cpu"))  # the runner's: it hands the model its plan
    assert model.lora_batch is lora.batch
    lora.batch.plan = object()  # type: ignore[assignment]
    assert not stack.takes(1, decode)  # a row uses an adapter
    lora.set_batch([-1])
    assert lora.batch.plan is None and stack.takes(1, decode)


def test_out_of_table_position_raises_and_writes_nothing(tmp_path: Path) -> None:
    model = _model("llama", "float32", tmp_path)
    cache = model.kv_cache  # type: ignore[attr-defined]
    before = cache.clone()
    meta = _meta(model, [1], [3], [[0]])
    with pytest.raises(IndexError, match="outside the rotary table"):
        _forward(model, [5], [model.cfg.max_position_embeddings + 4], meta)
    assert torch.equal(cache, before)
    vocab = model.cfg.vocab_size
    for bad in (vocab, -1):  # the embedding lookup is in the native call: ids are checked
        with pytest.raises(IndexError, match=f"token id {bad} is outside the embeddings"):
            _forward(model, [5, bad], [2, 3], _meta(model, [2], [4], [[0]]))
        assert torch.equal(cache, before)


@pytest.mark.parametrize("arch,quantize", [("llama", "int4"), ("qwen3", "w4a8"),
                                           ("qwen3", "none")])
def test_only_w4a8_or_dense_models_without_qk_norm_get_a_stack(arch: str, quantize: str,
                                                                tmp_path: Path) -> None:
    assert _model(arch, "float32", tmp_path, quantize).fused_stack is None


def test_dense_stack_takes_steps_of_any_size(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W4A8Weight, "max_rows", 4)  # the w4a8 regime's limit: not a dense one
    model = _model("llama", "float32", tmp_path, "none")
    stack = model.fused_stack
    assert stack is not None and not stack.w4a8
    many = 9
    assert stack.takes(many, _meta(model, [many], [many], [[0, 1, 2]]))


def test_stage_timing_changes_nothing(tmp_path: Path) -> None:
    """`stage_seconds` (benchmarks/step_stages.py --kernels) adds each kernel's time and leaves
    the outputs as they were."""
    from tokenmill.models.fused_stack import STAGES

    model = _model("llama", "bfloat16", tmp_path, kv="int8")
    stack = model.fused_stack
    assert stack is not None
    cache = model.kv_cache  # type: ignore[attr-defined]
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    meta = _meta(model, [12], [12], [list(range(4))])
    plain = _forward(model, ids, list(range(12)), meta)
    cache.zero_()
    stack.stage_seconds = torch.zeros(len(STAGES), dtype=torch.float64)
    timed = _forward(model, ids, list(range(12)), meta)
    assert torch.equal(plain, timed)
    assert (stack.stage_seconds > 0).all()
    first = stack.stage_seconds.clone()
    _forward(model, ids, list(range(12)), meta)
    assert (stack.stage_seconds > first).all()  # accumulates
