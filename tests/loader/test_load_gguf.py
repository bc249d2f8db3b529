"""GGUF loading: the real SmolLM2 file against transformers, tiny written files, broken files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tiny_gguf_writer import FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, write_tiny_gguf

from tokenmill.loader import ModelLoadError, resolve_model
from tokenmill.loader.gguf_weights import gguf_config, iter_gguf_weights, read_gguf

# --------------------------------------------------------------------------------------------
# The real default model


def test_smollm2_config_facts(smollm2_gguf: Path) -> None:
    source = resolve_model(str(smollm2_gguf))
    assert source.format == "gguf"
    assert source.path == smollm2_gguf
    cfg = source.config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == 576
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["intermediate_size"] == 1536
    assert cfg["vocab_size"] == 49152
    assert cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["attention_bias"] is False
    assert cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert source.generation_config() == {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2}


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model


@pytest.mark.slow
def test_smollm2_weights_match_transformers(smollm2_gguf: Path, transformers_smollm2: Any) -> None:
    reference = transformers_smollm2.state_dict()
    checked_layers = {0, 1, 17, 29}
    names: set[str] = set()
    compared = 0
    for name, tensor in resolve_model(str(smollm2_gguf)).iter_weights():
        names.add(name)
        assert tensor.dtype == torch.float32
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is None or int(layer) in checked_layers:
            expected = reference[name]
            assert tensor.shape == expected.shape, name
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
            compared += 1
    # Tied embeddings: transformers' lm_head.weight is the embedding, we emit none.
    assert names == set(reference) - {"lm_head.weight"}
    assert compared == 2 + 9 * len(checked_layers)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2_gguf: Path, transformers_smollm2: Any) -> None:
    ours = gguf_config(smollm2_gguf)
    theirs = transformers_smollm2.config
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == getattr(theirs, key), key
    assert math.isclose(ours["rms_norm_eps"], theirs.rms_norm_eps, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------
# Tiny files written here


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_round_trips(tmp_path: Path, arch: str) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    expected = write_tiny_gguf(path, arch, q8_embeddings=arch == "llama")
    source = resolve_model(str(path))
    assert source.format == "gguf"
    got = dict(source.iter_weights())
    assert set(got) == set(expected)
    for name, w in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], torch.from_numpy(w)), name

    cfg = source.config()
    arch_name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    assert cfg["architectures"] == [f"{arch_name}ForCausalLM"]
    assert cfg["model_type"] == arch
    assert cfg["hidden_size"] == HIDDEN
    assert cfg["num_hidden_layers"] == LAYERS
    assert cfg["intermediate_size"] == FFN
    assert cfg["num_attention_heads"] == HEADS
    assert cfg["num_key_value_heads"] == KV_HEADS
    assert cfg["head_dim"] == HEAD_DIM
    assert cfg["vocab_size"] == VOCAB
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 256
    assert cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is (arch == "qwen2")
    assert source.generation_config() == {"bos_token_id": 1, "eos_token_id": [2, 3]}


def test_tied_gguf_and_folder_with_one_gguf(tmp_path: Path) -> None:
    expected = write_tiny_gguf(tmp_path / "only.gguf", tied=True)
    source = resolve_model(str(tmp_path))
    assert (source.format, source.path) == ("gguf", tmp_path / "only.gguf")
    assert source.config()["tie_word_embeddings"] is True
    assert "lm_head.weight" not in dict(source.iter_weights())
    assert "lm_head.weight" not in expected

    write_tiny_gguf(tmp_path / "second.gguf")
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        resolve_model(str(tmp_path))


def test_rope_freqs_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "llama3.gguf"
    expected = write_tiny_gguf(
        path, extra={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)}
    )
    with caplog.at_level("WARNING", logger="tokenmill.loader"):
        got = dict(iter_gguf_weights(path))
    assert set(got) == set(expected)
    assert "rope_freqs" in caplog.text


def test_unknown_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ModelLoadError, match=r"unknown tensor 'blk\.0\.mystery\.weight'") as e:
        list(iter_gguf_weights(path))
    assert str(path) in str(e.value)


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = resolve_model(str(path))  # the header is fine
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'mamba'") as e:
        source.config()
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------------------------
# Broken files


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    return data, int(read_gguf(path).data_offset)


def _broken(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda n, off: n - 10, id="end-of-tensor-data"),
        pytest.param(lambda n, off: off + 100, id="start-of-tensor-data"),
        pytest.param(lambda n, off: off - 7, id="tensor-infos"),
        pytest.param(lambda n, off: 200, id="metadata"),
        pytest.param(lambda n, off: 10, id="fixed-header"),
    ],
)
def test_truncated_gguf_names_the_file(
    tmp_path: Path, tiny_gguf_bytes: tuple[bytes, int], cut: Any
) -> None:
    data, data_offset = tiny_gguf_bytes
    path = _broken(tmp_path, data[: cut(len(data), data_offset)])
    with pytest.raises(ModelLoadError) as e:
        source = resolve_model(str(path))
        source.config()
        list(source.iter_weights())
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_random_bytes_are_not_gguf(tmp_path: Path) -> None:
    path = _broken(tmp_path, np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a GGUF file") as e:
        resolve_model(str(path))
    assert str(path) in str(e.value)


def test_random_bytes_after_magic(tmp_path: Path) -> None:
    path = _broken(tmp_path, b"GGUF" + np.random.default_rng(2).bytes(4096))
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_tensor_offset_past_the_end(tmp_path: Path, tiny_gguf_bytes: tuple[bytes, int]) -> None:
    # Rewrite the last tensor's offset in its tensor-info record to point beyond the file.
    data, _ = tiny_gguf_bytes
    good = _broken(tmp_path, data)
    reader = read_gguf(good)
    last = reader.tensors[-1]
    offset_part = last.field.parts[-1]  # uint64 offset relative to the data area
    pos = last.field.offset + sum(int(p.nbytes) for p in last.field.parts[:-1])
    assert int(np.frombuffer(data[pos : pos + 8], "<u8")[0]) == int(offset_part[0])
    lying = bytearray(data)
    lying[pos : pos + 8] = np.array([len(data)], "<u8").tobytes()
    path = tmp_path / "lying.gguf"
    path.write_bytes(bytes(lying))
    with pytest.raises(ModelLoadError) as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model(str(tmp_path / "absent.gguf"))
