"""Hugging Face folders: sharded and single safetensors, header validation, refused pickles."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tokenmill.loader import ModelLoadError, resolve_model
from tokenmill.loader.safetensors_weights import iter_safetensors_weights

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "num_hidden_layers": 2,
}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}
    for i in range(2):
        out[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g).to(
            torch.bfloat16
        )
    out["model.norm.weight"] = torch.ones(8, dtype=torch.float16)
    return out


def _folder(tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def _sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = _folder(tmp_path)
    tensors = _tensors()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:3],
        "model-00002-of-00002.safetensors": names[3:],
    }
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, tensors


def _write_raw(
    path: Path, header: dict[str, object], data: bytes, *, length: int | None = None
) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


# --------------------------------------------------------------------------------------------


def test_sharded_folder_loads_every_tensor(tmp_path: Path) -> None:
    folder, tensors = _sharded(tmp_path)
    source = resolve_model(str(folder))
    assert (source.format, source.path) == ("hf", folder)
    assert source.config() == CONFIG
    assert source.generation_config() == {}
    got = dict(source.iter_weights())
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name], t), name


def test_single_file_and_generation_config(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    tensors = _tensors(1)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    source = resolve_model(str(folder))
    assert source.generation_config() == {"eos_token_id": [2, 3]}
    got = dict(source.iter_weights())
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors") as e:
        resolve_model(str(folder))
    assert "missing" in str(e.value)


def test_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"'model\.extra\.weight'.*not in this shard"):
        list(resolve_model(str(folder)).iter_weights())


def test_shard_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder, _ = _sharded(tmp_path)
    index = {"weight_map": {"a": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        resolve_model(str(folder))


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        pytest.param({}, b"", 10**9, "header length 1000000000 runs past the end", id="length"),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 8,
            None,
            r"tensor 'w': data_offsets \[0, 16\] run past the end",
            id="offsets-past-end",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
            b"\0" * 16,
            None,
            "needs 16 bytes but data_offsets span 8",
            id="shape-vs-span",
        ),
        pytest.param(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
            None,
            "'a' and 'b' overlap",
            id="overlap",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            b"\0" * 8,
            None,
            r"invalid data_offsets \[8, 0\]",
            id="reversed",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
            b"\0" * 8,
            None,
            "invalid data_offsets",
            id="negative",
        ),
        pytest.param(
            {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}},
            b"\0",
            None,
            "unknown dtype 'Q4'",
            id="dtype",
        ),
        pytest.param(
            {"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "invalid shape",
            id="shape",
        ),
    ],
)
def test_lying_headers_are_refused(
    tmp_path: Path, header: dict[str, object], data: bytes, length: int | None, message: str
) -> None:
    folder = _folder(tmp_path)
    path = _write_raw(folder / "model.safetensors", header, data, length=length)
    with pytest.raises(ModelLoadError, match=message) as e:
        list(resolve_model(str(folder)).iter_weights())
    assert str(path) in str(e.value)


def test_bad_json_header(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="not valid JSON") as e:
        list(iter_safetensors_weights(folder))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("keep", [4, 60, -3])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    folder = _folder(tmp_path)
    path = folder / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError) as e:
        list(resolve_model(str(folder)).iter_weights())
    assert str(path) in str(e.value)


def test_pickle_only_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    folder = _folder(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="pickle") as e:
        resolve_model(str(folder))
    assert "pytorch_model.bin" in str(e.value)
    with pytest.raises(ModelLoadError, match="pickle"):
        resolve_model(str(folder / "pytorch_model.bin"))
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="pickle"):
        resolve_model(str(folder))


def test_missing_config_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "noconfig"
    folder.mkdir()
    save_file(_tensors(), str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"config\.json: missing"):
        resolve_model(str(folder))


def test_missing_weights_are_named(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing"):
        resolve_model(str(folder))


def test_broken_config_json(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    save_file(_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{ broken")
    with pytest.raises(ModelLoadError, match="not valid JSON") as e:
        resolve_model(str(folder))
    assert str(folder / "config.json") in str(e.value)


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model("./definitely/not/here")
