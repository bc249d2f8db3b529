"""Hub ids resolved from a hand-built Hugging Face cache, offline (no hub is reachable here).

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE once, at import. The loader
re-reads them at call time, so monkeypatching the environment is enough; the constants are
patched as well so nothing falls back to the real cache, and one test runs a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_gguf_writer import write_tiny_gguf
from tokenizers import Tokenizer, models, pre_tokenizers

from tokenmill.loader import ModelLoadError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4}


def _tokenizer_json() -> bytes:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def add_repo(
    cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT, ref: str = "main"
) -> Path:
    """Lay out `models--org--name/{blobs,snapshots,refs}` like huggingface_hub does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def _safetensors_bytes(tmp_path: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    tensors = {"model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    path = tmp_path / "scratch.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes(), tensors


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def tiny_repo(hub_cache: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    weights, tensors = _safetensors_bytes(tmp_path)
    snapshot = add_repo(
        hub_cache,
        "org/name",
        {
            "config.json": json.dumps(CONFIG).encode(),
            "generation_config.json": b'{"eos_token_id": 2}',
            "model.safetensors": weights,
            "tokenizer.json": _tokenizer_json(),
        },
    )
    return snapshot, tensors


def test_hub_id_resolves_to_the_cached_snapshot(
    tiny_repo: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    snapshot, tensors = tiny_repo
    for source in (resolve_model("org/name"), resolve_model("org/name", revision=COMMIT)):
        assert source.format == "hf"
        assert source.model_id == "org/name"
        assert source.path.resolve() == snapshot.resolve()
        assert source.config() == CONFIG
        assert source.generation_config() == {"eos_token_id": 2}
        assert (source.path / "tokenizer.json").is_file()
        got = dict(source.iter_weights())
        assert torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])


def test_named_branch(hub_cache: Path, tmp_path: Path) -> None:
    weights, _ = _safetensors_bytes(tmp_path)
    other = "f" * 40
    files = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": weights}
    snapshot = add_repo(hub_cache, "org/name", files, commit=other, ref="dev")
    assert resolve_model("org/name", revision="dev").path.resolve() == snapshot.resolve()


def test_unknown_id_offline(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        resolve_model("org/absent")
    message = str(e.value)
    assert "org/absent" in message
    assert "HF_HUB_OFFLINE" in message
    assert str(hub_cache.resolve()) in message or str(hub_cache) in message


def test_unknown_revision_offline(tiny_repo: tuple[Path, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(ModelLoadError, match=r"revision 'nope'.*HF_HUB_OFFLINE"):
        resolve_model("org/name", revision="nope")
    with pytest.raises(ModelLoadError, match="not in the Hub cache"):
        resolve_model("org/name", revision="e" * 40)


def test_invalid_hub_id(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither an existing local path nor a valid Hub"):
        resolve_model("bad id with spaces!")


def test_repo_without_safetensors(hub_cache: Path) -> None:
    # A repo that only has pytorch_model.bin: the pickle is never fetched, so only config.json.
    add_repo(hub_cache, "org/pickled", {"config.json": json.dumps(CONFIG).encode()})
    with pytest.raises(ModelLoadError, match=r"pickle checkpoints such as pytorch_model\.bin"):
        resolve_model("org/pickled")


def test_gguf_repo(hub_cache: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch.gguf"
    write_tiny_gguf(scratch)
    snapshot = add_repo(hub_cache, "org/gguf", {"tiny-f32.gguf": scratch.read_bytes()})
    source = resolve_model("org/gguf")
    assert source.format == "gguf"
    assert source.path == snapshot / "tiny-f32.gguf"
    assert source.config()["hidden_size"] == 64

    # One file of a repo holding several quantizations.
    add_repo(hub_cache, "org/gguf", {"tiny-copy.gguf": scratch.read_bytes() + b""})
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        resolve_model("org/gguf")
    one = resolve_model("org/gguf/tiny-copy.gguf")
    assert (one.format, one.path) == ("gguf", snapshot / "tiny-copy.gguf")
    with pytest.raises(ModelLoadError, match=r"has no file 'absent\.gguf'"):
        resolve_model("org/gguf/absent.gguf")


def test_fresh_interpreter_reads_the_environment(
    tiny_repo: tuple[Path, dict[str, torch.Tensor]], hub_cache: Path
) -> None:
    """With the variables set before huggingface_hub is imported (the server's case)."""
    snapshot, _ = tiny_repo
    src = Path(__file__).resolve().parents[2] / "src"
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(src)!r})
        from tokenmill.loader import ModelLoadError, resolve_model
        print(resolve_model("org/name").path.resolve())
        try:
            resolve_model("org/absent")
        except ModelLoadError as e:
            print("error:", e)
        """
    )
    env = {**os.environ, "HF_HOME": str(hub_cache.parent), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE")  # HF_HOME/hub must be found on its own
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(snapshot.resolve())
    assert lines[1].startswith("error:") and "HF_HUB_OFFLINE" in lines[1]


def test_lora_adapter_from_hub_cache(hub_cache: Path, tmp_path: Path) -> None:
    """`--lora-adapters org/name[@rev]` resolves through the same cache; specs parse as TGI's."""
    from lora_files import SHAPES, write_adapter
    from tokenmill.lora import adapter_location, load_peft_adapter, parse_adapter_specs

    src = write_adapter(tmp_path / "src", rank=2)
    add_repo(hub_cache, "org/tiny-lora", {f.name: f.read_bytes() for f in src.iterdir()})
    snapshot = adapter_location("org/tiny-lora")
    assert (snapshot / "adapter_config.json").is_file()
    assert adapter_location("org/tiny-lora@main") == snapshot
    adapter = load_peft_adapter(snapshot, "t", num_layers=30, module_shapes=SHAPES)
    assert adapter.rank == 2
    with pytest.raises(ModelLoadError, match=r"LoRA adapter 'org/missing'.*HF_HUB_OFFLINE"):
        adapter_location("org/missing")
    assert parse_adapter_specs(["org/tiny-lora", f"x={src}", str(src), "y=org/a@v1"]) == [
        ("org/tiny-lora", "org/tiny-lora"), ("x", str(src)), ("src", str(src)),
        ("y", "org/a@v1")]
    for bad in (["a=b=c"], ["org/x@1@2"], ["x=a", "x=b"], ["=a"]):
        with pytest.raises(ValueError):
            parse_adapter_specs(bad)
