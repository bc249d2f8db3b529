"""Reading Hugging Face safetensors checkpoints (single file or sharded), memory-mapped.

Every file's header is validated here before `safetensors.safe_open` maps it, so a corrupt or
hostile file gives a `ModelLoadError` naming the file and tensor instead of a Rust panic, a
huge allocation or a read past the end. Pickle checkpoints are never opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.loader.errors import ModelLoadError

__all__ = [
    "INDEX_NAME",
    "PICKLE_PATTERNS",
    "SafetensorsEntry",
    "find_pickle_checkpoints",
    "iter_safetensors_weights",
    "read_safetensors_header",
    "safetensors_files",
]

logger = logging.getLogger("tokenmill.loader")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Checkpoint files that need pickle (torch.load) to read; refused, never opened.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# Same cap as the safetensors library itself.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of each safetensors dtype.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor as described by a safetensors header (offsets relative to the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _fail(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}", path=path)


def read_safetensors_header(path: Path) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Parse and validate the header of one safetensors file.

    Returns the tensors (by name) with absolute byte offsets, and the `__metadata__` dict.
    Raises `ModelLoadError` for anything that `safe_open` would trip over or that lies about
    the file: a header length past the end, bad JSON, unknown dtypes, offsets outside the
    data area, overlapping tensors or a shape that does not match its byte span.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"not a safetensors file: only {size} bytes, no header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise _fail(
                    path,
                    f"header length {header_len} runs past the end of the file ({size} bytes);"
                    " the file is truncated or not a safetensors file",
                )
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
            raw = f.read(header_len)
    except OSError as e:
        raise _fail(path, f"cannot read file: {e.strerror or e}") from e
    if len(raw) != header_len:
        raise _fail(path, "file shrank while reading the header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON ({e}); not a safetensors file?") from e
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")

    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict):
        raise _fail(path, "__metadata__ is not a JSON object")
    metadata = {str(k): str(v) for k, v in metadata_raw.items()}

    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, SafetensorsEntry] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _fail(path, f"tensor {name!r}: header entry is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(path, f"tensor {name!r}: invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _fail(path, f"tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise _fail(path, f"tensor {name!r}: invalid data_offsets [{begin}, {end}]")
        if end > data_len:
            raise _fail(
                path,
                f"tensor {name!r}: data_offsets [{begin}, {end}] run past the end of the data"
                f" ({data_len} bytes); the file is truncated or its header lies",
            )
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 != 0 or bits // 8 != end - begin:
            raise _fail(
                path,
                f"tensor {name!r}: shape {shape} of {dtype} needs {bits / 8:g} bytes but"
                f" data_offsets span {end - begin}",
            )
        entries[name] = SafetensorsEntry(
            name=name,
            dtype=dtype,
            shape=tuple(shape),
            begin=data_start + begin,
            end=data_start + end,
        )

    prev: SafetensorsEntry | None = None
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if prev is not None and entry.begin < prev.end:
            raise _fail(path, f"tensors {prev.name!r} and {entry.name!r} overlap in the file")
        prev = entry
    return entries, metadata


def find_pickle_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in `folder` that would need pickle to load."""
    found: set[Path] = set()
    for pattern in PICKLE_PATTERNS:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _fail(index_path, f"cannot read file: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(index_path, f"not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _fail(index_path, "has no 'weight_map' object of tensor name to shard file")
    return weight_map


def _shard_path(folder: Path, index_path: Path, shard: str) -> Path:
    candidate = folder / shard
    # A shard name must stay inside the model folder (no absolute paths or '..').
    if Path(shard).is_absolute() or ".." in Path(shard).parts:
        raise _fail(index_path, f"shard {shard!r} is outside the model folder")
    return candidate


def safetensors_files(folder: Path) -> list[tuple[Path, set[str] | None]]:
    """The safetensors files of a Hugging Face model folder, in load order.

    With `model.safetensors.index.json` these are the shards it lists (each with the tensor
    names the index assigns to it); otherwise `model.safetensors`, or every `*.safetensors`.
    Raises `ModelLoadError` if a listed shard is missing or there are no weights at all.
    """
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(shard, set()).add(tensor)
        out: list[tuple[Path, set[str] | None]] = []
        for shard in sorted(shards):
            p = _shard_path(folder, index_path, shard)
            if not p.is_file():
                raise ModelLoadError(f"{p}: shard listed in {index_path.name} is missing", path=p)
            out.append((p, shards[shard]))
        if not out:
            raise _fail(index_path, "weight_map is empty")
        return out
    single = folder / SINGLE_NAME
    if single.is_file():
        return [(single, None)]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = find_pickle_checkpoints(folder)
        if pickles:
            raise ModelLoadError(
                f"{folder}: no *.safetensors weights, only {pickles[0].name}; pickle checkpoints"
                " are refused (they can run arbitrary code): convert it to safetensors",
                path=pickles[0],
            )
        raise ModelLoadError(
            f"{folder}: no model.safetensors (or other *.safetensors) weights", path=folder
        )
    return [(p, None) for p in files]


def _open_error(path: Path, e: Exception) -> ModelLoadError:
    return _fail(path, f"safetensors could not read it: {e}")


def iter_safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the model in `folder`, one at a time.

    Each file is validated first, then memory-mapped with `safetensors.safe_open`; tensors keep
    their stored dtype. Names are the checkpoint's own (Hugging Face) names.
    """
    from safetensors import safe_open

    seen: set[str] = set()
    for path, expected in safetensors_files(Path(folder)):
        entries, _ = read_safetensors_header(path)
        if expected is not None:
            missing = sorted(expected - entries.keys())
            if missing:
                raise _fail(
                    path,
                    f"tensor {missing[0]!r} listed in {INDEX_NAME} is not in this shard"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                )
        logger.debug("reading %d tensors from %s", len(entries), path)
        try:
            handle: Any = safe_open(os.fspath(path), framework="pt")
        except Exception as e:
            raise _open_error(path, e) from e
        with handle as f:
            # File order keeps reads sequential over the memory map.
            for entry in sorted(entries.values(), key=lambda e: e.begin):
                name = entry.name
                if expected is not None and name not in expected:
                    # Tensor present in the file but the index assigns it elsewhere (or
                    # nowhere): the index is authoritative, as in transformers.
                    continue
                if name in seen:
                    raise _fail(path, f"tensor {name!r} appears in more than one file")
                seen.add(name)
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise _fail(path, f"tensor {name!r}: {e}") from e
                yield name, tensor
