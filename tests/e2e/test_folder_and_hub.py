"""The whole offline API from a Hugging Face folder and from a Hub cache (offline): model and
tokenizer together, greedy output equal to transformers on the same tiny random model."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmill.llm import LLM  # noqa: E402
from tokenmill.protocol import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, default_gguf: Path) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer, in Hugging Face layout."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent,
                                                     gguf_file=default_gguf.name)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # sharper distributions: fewer near-ties under greedy decoding
    model.save_pretrained(path)
    return path


def greedy_reference(path: Path, ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def check_llm(llm: LLM, folder: Path) -> None:
    prompt = "The quick brown fox jumps over"
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.0,
                                              ignore_eos=True))[0]
    assert out.token_ids == greedy_reference(folder, ids, 20)
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_local_folder(tiny_folder: Path) -> None:
    llm = LLM(str(tiny_folder), dtype="float32", max_batch_total_tokens=2048)
    assert llm.engine.info.eos_token_ids == [2]
    check_llm(llm, tiny_folder)


def test_hub_cache_offline(tiny_folder: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The Hub cache layout: blobs by hash, a snapshot of symlinks per commit, refs/main.
    repo = tmp_path / "hub" / "models--tm-test--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in tiny_folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        os.symlink(Path("..", "..", "blobs", digest), snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = LLM("tm-test/tiny-llama", dtype="float32", max_batch_total_tokens=2048)
    assert llm.engine.info.model_id == "tm-test/tiny-llama"
    check_llm(llm, tiny_folder)
