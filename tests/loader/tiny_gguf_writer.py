"""Writes tiny GGUF files (as llama.cpp's converter would) for the loader tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 64, 4, 2, 16, 96, 2, 32


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (what the loader must undo)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llamacpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `_llamacpp_permute`."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(
    arch: str, *, tied: bool, bias: bool, qk_norm: bool, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": r(VOCAB, HIDDEN)}
    w["model.norm.weight"] = r(HIDDEN)
    if not tied:
        w["lm_head.weight"] = r(VOCAB, HIDDEN)
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = r(q_out, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = r(kv_out, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = r(kv_out, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = r(HIDDEN, q_out)
        if bias:
            w[p + "self_attn.q_proj.bias"] = r(q_out)
            w[p + "self_attn.k_proj.bias"] = r(kv_out)
            w[p + "self_attn.v_proj.bias"] = r(kv_out)
        if qk_norm:
            w[p + "self_attn.q_norm.weight"] = r(HEAD_DIM)
            w[p + "self_attn.k_norm.weight"] = r(HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = r(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = r(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = r(HIDDEN, FFN)
        w[p + "input_layernorm.weight"] = r(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = r(HIDDEN)
    return w


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def _gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{_TO_GGUF['.'.join(module)]}.{kind}"


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    tied: bool = False,
    q8_embeddings: bool = False,
    linear_types: dict[str, str] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny GGUF of `arch`; returns the HF-named weights a loader should give back.
    `linear_types` stores the layers' 2-D weights quantized: {"*": "Q4_1"} all of them, or
    per GGUF name ("blk.0.ffn_down.weight": "Q8_0"), a name winning over "*"."""
    bias = arch == "qwen2"
    hf = _hf_weights(arch, tied=tied, bias=bias, qk_norm=arch == "qwen3")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIM)
        writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)
    expected: dict[str, np.ndarray] = {}
    for name, w in hf.items():
        g = _gguf_name(name)
        stored = w
        if arch == "llama" and g.split(".")[-2:-1] == ["attn_q"]:
            stored = _llamacpp_permute(w, HEADS)
        elif arch == "llama" and g.split(".")[-2:-1] == ["attn_k"]:
            stored = _llamacpp_permute(w, KV_HEADS)
        kind = None
        if g.startswith("blk.") and stored.ndim == 2 and linear_types:
            kind = linear_types.get(g, linear_types.get("*"))
        if kind is not None:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            quantized = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(g, quantized, raw_dtype=qtype)
            back = gguf.quants.dequantize(quantized, qtype)
            if arch == "llama" and g.split(".")[-2] in ("attn_q", "attn_k"):
                heads = HEADS if g.split(".")[-2] == "attn_q" else KV_HEADS
                back = _llamacpp_unpermute(back, heads)
            expected[name] = back
        elif q8_embeddings and g == "token_embd.weight":
            qtype = gguf.GGMLQuantizationType.Q8_0
            quantized = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(g, quantized, raw_dtype=qtype)
            expected[name] = gguf.quants.dequantize(quantized, qtype)
        else:
            writer.add_tensor(g, stored)
            expected[name] = w
    for g, w in (extra or {}).items():
        writer.add_tensor(g, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
