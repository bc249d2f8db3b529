"""The Llama-family decoder stack of a step as one native call.

On CPU, with w4a8 weights or dense ones in tokenmill's tiles (layers/dense.py), every matmul
is a native kernel, and so are the norms, rotary + cache write, attention (each row straight
from the paged cache, prefill rows included) and SiLU · up; what is left in Python is glue,
~90 µs a layer (module calls, checks, views, allocations), a third of a batch-1 decode step.
`FusedStack` hands the whole stack to kernels/csrc/decode_stack.cpp, which chains the same
kernels in the same order, so the two paths give the same bits; the embedding lookup and the
final norm are in the call too (in Python, with the caches cold from the weights' stream, the
two took ~0.2 ms of a ~5 ms batch-1 step)
(tests/models/test_fused_stack.py). It runs every step in which no row uses a LoRA adapter
and, with w4a8 weights, that has at most `W4A8Weight.max_rows` rows (the quantized kernels'
regime: all, unless a test lowers it); otherwise the layers run one by one.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, cast

import torch

from tokenmill.kernels.cpu import MAX_DECODE_GROUP_DIM, cache_head, cache_matches, cpu_kernels
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.dense import TiledWeight
from tokenmill.layers.linear import Linear
from tokenmill.layers.quant import W4A8Weight

if TYPE_CHECKING:
    from tokenmill.models.llama import DecoderLayer, LlamaForCausalLM

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

CACHED_ROWS = 64  # steps of at most this many rows reuse the stack's work buffers


class _Layer(ctypes.Structure):  # mirrors `Layer` in decode_stack.cpp
    _fields_ = [(name, _P) for name in (
        "in_norm", "post_norm", "qkv_w", "qkv_s", "qkv_bias", "o_w", "o_s", "gu_w", "gu_s",
        "down_w", "down_s", "kv")]


class _Stack(ctypes.Structure):
    _fields_ = [("n_layers", _I), ("H", _I), ("I", _I), ("Hq", _I), ("Hk", _I), ("D", _I),
                ("bs", _I), ("kv_head", _I), ("eps", _F), ("scale", _F), ("cos", _P),
                ("sin", _P), ("n_positions", _I), ("kv_int8", _I), ("embed", _P),
                ("vocab", _I), ("final_norm", _P)]


class _Step(ctypes.Structure):
    _fields_ = [("M", _I), ("positions", _P), ("slots", _P), ("tables", _P),
                ("table_stride", _I), ("row_seq", _P), ("bounds", _P), ("max_keys", _I),
                ("x", _P),
                ("residual", _P), ("h", _P), ("qkv", _P), ("gu", _P), ("act", _P),
                ("attn_scratch", _P), ("threads", ctypes.c_int), ("out_rows", _P),
                ("n_out", _I), ("out_row_seq", _P), ("out_bounds", _P),
                ("stage_seconds", _P), ("ids", _P), ("out", _P)]

# The stages `FusedStack.stage_seconds` times, in order (decode_stack.cpp's TM_STAGES).
STAGES = ("norm", "qkv", "rotary", "attention", "o", "norm2", "gate_up", "silu_mul", "down")


def _int64(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous int64 (itself when it is: a no-op `.to()` still costs a dispatch)."""
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    assert t.is_contiguous()
    return t


def _decoder_layers(model: LlamaForCausalLM) -> list[DecoderLayer]:
    return cast("list[DecoderLayer]", list(model.layers))


def _weights(linear: Linear, dtype: torch.dtype) -> tuple[int, int | None] | None:
    """(weights, scales) pointers of a matmul the stack runs: w4a8, or dense tiles of the
    activations' dtype (no scales); None for any other kind."""
    if isinstance(linear.quant, W4A8Weight):
        return linear.quant.packed.data_ptr(), linear.quant.scales.data_ptr()
    if (linear.quant is None and isinstance(linear.packed, TiledWeight)
            and linear.packed.dtype == dtype):
        return linear.packed.tiles.data_ptr(), None
    return None


class FusedStack:
    def __init__(self, model: LlamaForCausalLM) -> None:
        kernels = cpu_kernels()
        assert kernels is not None
        cfg = model.cfg
        self.model = model
        # float64 [len(STAGES)]: when set, every run adds its stages' wall time (seconds).
        self.stage_seconds: torch.Tensor | None = None
        self.dtype = model.embed_tokens.weight.dtype
        self._fn = kernels.decode_stack[self.dtype]
        layers = _decoder_layers(model)
        self.cos, self.sin = layers[0].self_attn.rotary.tables(self.dtype)
        kv = layers[0].self_attn.kv_cache
        hk, d = kv.shape[1], cfg.head_dim
        kv_head, bs = cache_head(kv, d)
        self.hq, self.hk, self.d = cfg.num_heads, hk, d
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        # The embedding lookup and the final norm run in the call too (their weights are
        # read through these pointers: the tensors stay the model's).
        embed = model.embed_tokens.weight
        self.stack = _Stack(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size,
                            cfg.num_heads, hk, d, bs, kv_head, cfg.rms_norm_eps,
                            d ** -0.5, self.cos.data_ptr(), self.sin.data_ptr(),
                            self.cos.shape[0], int(kv.dtype == torch.int8), embed.data_ptr(),
                            embed.shape[0], model.norm.weight.data_ptr())
        # Steps of up to CACHED_ROWS rows (decodes) reuse one set of work buffers: a fresh
        # set is ~10 allocations, each slow with the caches cold from the weights' stream.
        self._work: list[torch.Tensor] = []
        self._scratch = torch.empty(0, dtype=torch.float32)
        self.layers = (_Layer * cfg.num_layers)()
        # Whether a matmul is w4a8: then steps over `W4A8Weight.max_rows` rows take the layers.
        self.w4a8 = False
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, o, gu, down = (
                _weights(lin, self.dtype) or (0, None)
                for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
            self.w4a8 |= any(s is not None for _, s in (qkv, o, gu, down))
            bias = attn.qkv_proj.bias
            self.layers[i] = _Layer(
                layer.input_layernorm.weight.data_ptr(),
                layer.post_attention_layernorm.weight.data_ptr(), *qkv,
                None if bias is None else bias.data_ptr(), *o, *gu, *down,
                attn.kv_cache.data_ptr())

    @staticmethod
    def build(model: LlamaForCausalLM) -> FusedStack | None:
        """The stack for `model` with its KV cache bound, or None when it does not qualify:
        CPU, bfloat16 or float32, every decoder linear w4a8 or dense tiles of that dtype (bias
        only on qkv), no q/k norm, the native kernels loaded, a contiguous cache of the
        model's dtype or int8."""
        cfg = model.cfg
        dtype = model.embed_tokens.weight.dtype
        if (cpu_kernels() is None or dtype not in (torch.bfloat16, torch.float32)
                or model.embed_tokens.weight.device.type != "cpu" or cfg.qk_norm
                or cfg.num_heads % cfg.num_kv_heads
                or cfg.num_heads // cfg.num_kv_heads * cfg.head_dim > MAX_DECODE_GROUP_DIM):
            return None
        if (model.norm.weight.dtype != dtype or not model.embed_tokens.weight.is_contiguous()
                or model.norm.eps != cfg.rms_norm_eps):
            return None
        for layer in _decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            kv = attn.kv_cache
            if (any(_weights(lin, dtype) is None for lin in linears)
                    or any(lin.bias is not None for lin in linears[1:])
                    or not cache_matches(kv, dtype, cfg.head_dim) or not kv.is_contiguous()
                    or any(n.weight.dtype != dtype for n in (layer.input_layernorm,
                                                             layer.post_attention_layernorm))):
                return None
        return FusedStack(model)

    def takes(self, rows: int, meta: AttentionMetadata) -> bool:
        """A step of `rows` rows with per-row keys (CPU), no LoRA rows and, with w4a8
        weights, at most `W4A8Weight.max_rows` rows."""
        if meta.rows is None or (self.w4a8 and rows > W4A8Weight.max_rows):
            return False
        lora = self.model.lora_batch  # the LoRA manager's, shared by every LoraLinear
        return lora is None or lora.plan is None

    def _buffers(self, m: int) -> list[torch.Tensor]:
        """x, residual, h, qkv, gu, act for m rows (only the pointers are used: the first m
        rows of a larger buffer are the same memory)."""
        if self._work and m <= self._work[0].shape[0]:
            return self._work
        widths = (self.hidden, self.hidden, max(self.hidden, self.hq * self.d),
                  (self.hq + 2 * self.hk) * self.d, 2 * self.inter, self.inter)
        rows = CACHED_ROWS if m <= CACHED_ROWS else m
        work = [torch.empty(rows, w, dtype=self.dtype) for w in widths]
        if m <= CACHED_ROWS:
            self._work = work
        return work

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            out_rows: list[int] | None = None) -> torch.Tensor:
        """The step's token ids [M] through the embeddings, the decoder stack and the final
        norm: what the layer loop and `model.norm` would hand the LM head, of every row, or
        of `out_rows` (ascending) only, whose last layer then skips the other rows after
        writing their keys and values."""
        rows = meta.rows
        assert rows is not None
        m = ids.shape[0]
        ids, positions, slots = (_int64(t) for t in (ids, positions, meta.slot_mapping))
        assert rows.tables.is_contiguous()
        x, residual, h, qkv, gu, act = self._buffers(m)
        threads = torch.get_num_threads()
        max_keys = max(rows.max_keys, 1)
        need = threads * (self.hq // self.hk) * max_keys
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        n_out = m if out_rows is None or len(out_rows) >= m else len(out_rows)
        out = torch.empty(n_out, self.hidden, dtype=self.dtype)
        step = _Step(m, positions.data_ptr(), slots.data_ptr(), rows.tables.data_ptr(),
                     rows.tables.stride(0), rows.seq.data_ptr(), rows.bounds.data_ptr(),
                     max_keys, x.data_ptr(), residual.data_ptr(), h.data_ptr(), qkv.data_ptr(),
                     gu.data_ptr(), act.data_ptr(), self._scratch.data_ptr(), threads)
        step.ids, step.out = ids.data_ptr(), out.data_ptr()
        if self.stage_seconds is not None:
            assert self.stage_seconds.dtype == torch.float64
            assert self.stage_seconds.shape == (len(STAGES),)
            step.stage_seconds = self.stage_seconds.data_ptr()
        if out_rows is not None and n_out < m:
            # A sentinel after the rows: never a null pointer, even for none (an empty
            # tensor's may be); the kernel reads only the first n_out.
            keep = torch.tensor([*out_rows, 0], dtype=torch.int64)
            out_seq = rows.seq[keep[:n_out]].contiguous()
            out_bounds = rows.bounds[keep[:n_out]].contiguous()
            step.out_rows, step.n_out = keep.data_ptr(), n_out
            step.out_row_seq, step.out_bounds = out_seq.data_ptr(), out_bounds.data_ptr()
        bad = self._fn(self.layers, ctypes.byref(self.stack), ctypes.byref(step))
        if bad >= 0:
            raise IndexError(f"position {int(positions[bad])} is outside the rotary table "
                             f"({self.stack.n_positions} positions)")
        if bad <= -2:
            raise IndexError(f"token id {int(ids[-2 - bad])} is outside the embeddings "
                             f"({self.stack.vocab} rows)")
        return out
