"""Reading GGUF files (llama.cpp's format): validation, a Hugging Face config, HF-named weights.

The file is opened with `gguf.GGUFReader` (a numpy memmap). Every tensor is dequantized to
float32 on its own as it is yielded, in Hugging Face orientation (`(out, in)` for linear
weights), with llama.cpp's rope permutation of Llama's Q/K projections undone.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenmill.loader.errors import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

__all__ = [
    "GGUF_ARCHITECTURES",
    "gguf_config",
    "gguf_generation_config",
    "gguf_metadata",
    "hf_tensor_name",
    "iter_gguf_weights",
    "read_gguf",
]

logger = logging.getLogger("tokenmill.loader")

GGUF_MAGIC = b"GGUF"

# general.architecture -> Hugging Face architectures
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# Tensors that carry no Hugging Face weight; skipped with a warning.
_SKIPPED = {"rope_freqs.weight"}


def _fail(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}", path=path)


# --------------------------------------------------------------------------------------------
# Opening and validating


@functools.lru_cache(maxsize=4)
def _open_reader(path_str: str, mtime_ns: int, size: int) -> GGUFReader:
    """Open and validate; cached per (path, mtime, size) since parsing the vocab takes ~2 s."""
    del mtime_ns  # part of the cache key only
    from gguf import GGUFReader

    path = Path(path_str)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _fail(path, f"cannot read file: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise _fail(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path_str)
    except Exception as e:  # GGUFReader raises ValueError, IndexError, KeyError, ...
        raise _fail(
            path,
            f"corrupt or truncated GGUF file ({size} bytes): its header could not be parsed"
            f" ({type(e).__name__}: {e or 'unexpected end of data'})",
        ) from e
    _check_tensor_extents(path, reader, size)
    return reader


def _check_tensor_extents(path: Path, reader: GGUFReader, size: int) -> None:
    spans: list[tuple[int, int, str]] = []
    for t in reader.tensors:
        begin = int(t.data_offset)
        end = begin + int(t.n_bytes)
        if begin < int(reader.data_offset) or end > size:
            raise _fail(
                path,
                f"tensor {t.name!r} data [{begin}, {end}) lies outside the file's data area"
                f" [{reader.data_offset}, {size}); the file is truncated or its header lies",
            )
        if int(t.data.nbytes) != int(t.n_bytes):
            raise _fail(path, f"tensor {t.name!r} is truncated")
        spans.append((begin, end, t.name))
    spans.sort()
    for (_, prev_end, prev_name), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise _fail(path, f"tensors {prev_name!r} and {name!r} overlap in the file")


def read_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A validated `gguf.GGUFReader` for `path` (raises `ModelLoadError` naming the file)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise _fail(p, f"cannot read file: {e.strerror or e}") from e
    if not p.is_file():
        raise _fail(p, "not a file")
    return _open_reader(os.fspath(p), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------------------------
# Metadata


def _value(reader: GGUFReader, key: str) -> Any:
    """A metadata value as a Python object (float32 values rounded to their shortest repr)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.FLOAT32:
        # 1e-5 is stored as 9.99999974e-06; give back what the converter was given.
        value = float(str(np.float32(value)))
    return value


def gguf_metadata(path: str | os.PathLike[str], key: str) -> Any:
    """One metadata value of a GGUF file (None when absent), e.g. `tokenizer.chat_template`."""
    return _value(read_gguf(path), key)


def _int(path: Path, reader: GGUFReader, key: str, default: int | None = None) -> int:
    value = _value(reader, key)
    if isinstance(value, list):
        # Per-layer arrays (some architectures); uniform ones are fine.
        if value and all(v == value[0] for v in value):
            value = value[0]
        else:
            raise _fail(path, f"metadata {key} varies per layer ({value}); not supported")
    if value is None:
        if default is None:
            raise _fail(path, f"metadata key {key} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(path, f"metadata {key} = {value!r} is not a non-negative integer")
    return value


def _float(path: Path, reader: GGUFReader, key: str, default: float) -> float:
    value = _value(reader, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"metadata {key} = {value!r} is not a number")
    return float(value)


def _architecture(path: Path, reader: GGUFReader) -> str:
    arch = _value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise _fail(path, "metadata general.architecture is missing")
    if arch not in GGUF_ARCHITECTURES:
        known = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise _fail(path, f"unsupported GGUF architecture {arch!r} (supported: {known})")
    return arch


def _tensor_dims(reader: GGUFReader) -> dict[str, list[int]]:
    """GGUF tensor dims (innermost first, i.e. reversed relative to torch)."""
    return {t.name: [int(d) for d in t.shape] for t in reader.tensors}


def _token_ids(reader: GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for hf, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        value = _value(reader, key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[hf] = value
    return out


def gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Hugging Face `config.json`-style dict synthesized from the GGUF metadata."""
    p = Path(path)
    reader = read_gguf(p)
    arch = _architecture(p, reader)
    dims = _tensor_dims(reader)

    hidden = _int(p, reader, f"{arch}.embedding_length")
    heads = _int(p, reader, f"{arch}.attention.head_count")
    kv_heads = _int(p, reader, f"{arch}.attention.head_count_kv", heads)
    if heads == 0 or kv_heads == 0 or heads % kv_heads != 0:
        raise _fail(p, f"bad head counts: {heads} query heads, {kv_heads} KV heads")
    head_dim = _int(p, reader, f"{arch}.attention.key_length", hidden // heads)

    if "token_embd.weight" in dims and len(dims["token_embd.weight"]) == 2:
        vocab = dims["token_embd.weight"][1]
    else:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else _int(p, reader, f"{arch}.vocab_size")

    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _int(p, reader, f"{arch}.block_count"),
        "intermediate_size": _int(p, reader, f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(p, reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _float(p, reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(p, reader, arch),
        "max_position_embeddings": _int(p, reader, f"{arch}.context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in dims,
        "attention_bias": "blk.0.attn_q.bias" in dims or arch == "qwen2",
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in dims
    if arch == "qwen2":
        config["use_sliding_window"] = False
    config.update(_token_ids(reader))
    return config


def _rope_scaling(path: Path, reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _value(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = _float(path, reader, f"{arch}.rope.scaling.factor", 1.0)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _int(path, reader, f"{arch}.rope.scaling.original_context_length", 0)
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    raise _fail(path, f"unsupported rope scaling type {kind!r}")


def gguf_generation_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`generation_config.json`-style token ids from the tokenizer metadata.

    `eos_token_id` is a list: the EOS token plus end-of-turn / end-of-message tokens if any.
    """
    reader = read_gguf(path)
    ids = _token_ids(reader)
    out: dict[str, Any] = {}
    if "bos_token_id" in ids:
        out["bos_token_id"] = ids["bos_token_id"]
    eos: list[int] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        value = _value(reader, key)
        if isinstance(value, int) and not isinstance(value, bool) and value not in eos:
            eos.append(value)
    if eos:
        out["eos_token_id"] = eos
    if "pad_token_id" in ids:
        out["pad_token_id"] = ids["pad_token_id"]
    return out


# --------------------------------------------------------------------------------------------
# Weights


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when it has no counterpart."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    layer, part, kind = m.groups()
    return f"model.layers.{int(layer)}.{_BLOCK_NAMES[part]}.{kind}"


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of Llama Q/K rows (weights and biases)."""
    rows = weight.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads) != 0:
        raise ValueError(f"{rows} rows cannot be split into {n_heads} rope heads")
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _dequantize(path: Path, t: ReaderTensor) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        array = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise _fail(
            path, f"tensor {t.name!r}: quantization type {t.tensor_type.name} is not supported"
        ) from e
    except Exception as e:
        raise _fail(path, f"tensor {t.name!r}: cannot dequantize ({e})") from e
    if array.size != int(np.prod(shape)):
        raise _fail(path, f"tensor {t.name!r}: {array.size} values for shape {list(shape)}")
    # float32, C-contiguous and writable (a F32 tensor is still a view of the read-only memmap).
    return np.array(array.reshape(shape), dtype=np.float32, copy=True, order="C")


def iter_gguf_weights(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, float32 tensor)` for every weight, one tensor at a time."""
    p = Path(path)
    reader = read_gguf(p)
    config = gguf_config(p)
    arch = config["model_type"]
    n_layers = config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    # Check names before any dequantization so a bad file fails fast.
    names: list[tuple[str, ReaderTensor]] = []
    for t in reader.tensors:
        if t.name in _SKIPPED:
            logger.warning(
                "%s: ignoring tensor %r (rope frequency factors are not supported)", p, t.name
            )
            continue
        hf = hf_tensor_name(t.name)
        if hf is None:
            raise _fail(p, f"unknown tensor {t.name!r} for architecture {arch!r}")
        m = _BLOCK_RE.fullmatch(t.name)
        if m is not None and int(m.group(1)) >= n_layers:
            raise _fail(p, f"tensor {t.name!r} is beyond block_count {n_layers}")
        names.append((hf, t))

    for hf, t in names:
        array = _dequantize(p, t)
        if arch == "llama" and t.name.startswith("blk."):
            part = t.name.split(".")[2]
            try:
                if part == "attn_q":
                    array = _unpermute(array, heads)
                elif part == "attn_k":
                    array = _unpermute(array, kv_heads)
            except ValueError as e:
                raise _fail(p, f"tensor {t.name!r}: {e}") from e
        yield hf, torch.from_numpy(array)
