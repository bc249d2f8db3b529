"""LoRA through the engine against transformers + peft on the default model, float32, greedy:
a batch mixing two adapters of different ranks and the base model gives each row exactly the
oracle's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tokenmill.protocol import SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def add(a, b):"]
NEW = 16
ADAPTERS = {
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "poet": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"]),
}


def greedy(model, tok_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([tok_ids]), attention_mask=torch.ones(1, len(tok_ids),
                             dtype=torch.long), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=2)
    return out[0, len(tok_ids):].tolist()


@pytest.fixture(scope="module")
def adapters_and_oracle(tmp_path_factory, default_gguf_path):
    from tokenmill.tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(default_gguf_path)
    ids = [tok.encode(p) for p in PROMPTS]
    base = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32).eval()
    expected: dict[str | None, list[list[int]]] = {None: [greedy(base, i) for i in ids]}
    paths: dict[str, Path] = {}
    g = torch.Generator().manual_seed(0)
    for name, cfg in ADAPTERS.items():
        pm = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **cfg))
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        pm.eval()
        paths[name] = tmp_path_factory.mktemp(name)
        pm.save_pretrained(paths[name])
        expected[name] = [greedy(pm, i) for i in ids]
        base = pm.unload()
    return ids, paths, expected


@pytest.fixture(scope="module")
def default_gguf_path():
    from tokenmill.loader import default_model_path

    return default_model_path()


def test_mixed_adapter_batch_matches_peft(adapters_and_oracle) -> None:
    from tokenmill.llm import LLM

    ids, paths, expected = adapters_and_oracle
    assert expected["sql"] != expected[None] and expected["poet"] != expected[None]
    llm = LLM(dtype="float32", max_batch_total_tokens=4096,
              lora_adapters=[f"{n}={p}" for n, p in paths.items()])
    assert llm.engine.info.adapters == ["sql", "poet"]
    eng = llm.engine
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    rows = [(i, a) for i in range(len(ids)) for a in (None, "sql", "poet")]
    rids = {eng.add_request(ids[i], params, adapter_id=a): (i, a) for i, a in rows}
    got: dict[tuple[int, str | None], list[int]] = {}
    while eng.has_unfinished:
        for out in eng.step():
            if out.finished:
                got[rids[out.request_id]] = out.token_ids
    for i, a in rows:
        assert got[(i, a)] == expected[a][i], (PROMPTS[i], a)
    with pytest.raises(ValueError, match="not loaded"):
        eng.add_request(ids[0], params, adapter_id="nope")


def test_bad_adapter_is_a_clean_startup_error(adapters_and_oracle, tmp_path) -> None:
    from tokenmill.llm import LLM
    from tokenmill.loader import ModelLoadError

    _, paths, _ = adapters_and_oracle
    bad = tmp_path / "dora"
    bad.mkdir()
    for f in paths["sql"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="use_dora"):
        LLM(dtype="float32", max_batch_total_tokens=1024, lora_adapters=[f"d={bad}"])
