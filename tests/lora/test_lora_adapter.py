"""PEFT adapter loading: parity with peft's merged weights, refusals, path safety."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

try:  # src layout: make `import tokenmill` work without an install
    import tokenmill  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from safetensors.torch import load_file, save_file

from tokenmill.lora.adapter import (
    AdapterError,
    load_peft_adapter,
    module_name,
    resolve_adapter_path,
)

NUM_LAYERS = 2
# module -> (in, out) for hidden 64, intermediate 128, 4 heads of 16, 2 KV heads.
SHAPES: dict[str, tuple[int, int]] = {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
}
ALL7 = list(SHAPES)

CONFIGS: dict[str, dict[str, Any]] = {
    "qv": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "regex": {
        "r": 16, "lora_alpha": 32,
        "target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj",
        "rank_pattern": {"k_proj": 4, r"model\.layers\.1\.mlp\.down_proj": 8},
        "alpha_pattern": {"v_proj": 8},
        "use_rslora": True,
    },
    "layer1": {"r": 4, "lora_alpha": 4, "target_modules": ALL7, "layers_to_transform": [1]},
}


def _tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """name -> (saved adapter dir, {(layer, module): PEFT's merged delta})."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    out: dict[str, tuple[Path, dict]] = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        model = _tiny_model()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        peft_model = get_peft_model(model, LoraConfig(**kwargs))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        path = root / name
        peft_model.save_pretrained(str(path))
        merged = peft_model.merge_and_unload().state_dict()
        deltas = {}
        for layer in range(NUM_LAYERS):
            for mod in ALL7:
                key = module_name(layer, mod) + ".weight"
                deltas[(layer, mod)] = merged[key] - base[key]
        out[name] = (path, deltas)
    return out


def _load(path: Path, **kw: Any) -> Any:
    kw.setdefault("num_layers", NUM_LAYERS)
    kw.setdefault("module_shapes", SHAPES)
    return load_peft_adapter(path, "test", **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_peft_merged_delta(adapters: dict, name: str) -> None:
    path, deltas = adapters[name]
    ad = _load(path)
    for (layer, mod), delta in deltas.items():
        if (layer, mod) not in ad.weights:
            assert torch.count_nonzero(delta) == 0, (layer, mod)
            continue
        a, b, scale = ad.weights[(layer, mod)]
        assert a.dtype == torch.float32
        assert a.shape[1] == SHAPES[mod][0] and b.shape[0] == SHAPES[mod][1]
        torch.testing.assert_close(scale * (b @ a), delta, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(delta) > 0


def test_selection_ranks_and_scales(adapters: dict) -> None:
    qv = _load(adapters["qv"][0])
    assert set(qv.weights) == {(i, m) for i in range(2) for m in ("q_proj", "v_proj")}
    assert qv.rank == 8 and all(s == 2.0 for _, _, s in qv.weights.values())

    rx = _load(adapters["regex"][0])
    assert len(rx.weights) == 14 and rx.rank == 16
    assert rx.weights[(0, "k_proj")][0].shape[0] == 4
    assert rx.weights[(1, "down_proj")][0].shape[0] == 8
    assert rx.weights[(0, "down_proj")][0].shape[0] == 16
    assert rx.weights[(0, "q_proj")][2] == pytest.approx(32 / 4)  # rslora: alpha / sqrt(r)
    assert rx.weights[(0, "v_proj")][2] == pytest.approx(8 / 4)
    assert rx.weights[(0, "k_proj")][2] == pytest.approx(32 / 2)

    l1 = _load(adapters["layer1"][0])
    assert set(l1.weights) == {(1, m) for m in ALL7}


def test_dtype(adapters: dict) -> None:
    ad = _load(adapters["qv"][0], dtype=torch.bfloat16)
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b, _ in ad.weights.values())


@pytest.fixture
def bad(adapters: dict, tmp_path: Path) -> Path:
    path = tmp_path / "bad"
    shutil.copytree(adapters["qv"][0], path)
    return path


def _edit_config(path: Path, **changes: Any) -> None:
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize(("changes", "field"), [
    ({"use_dora": True}, r"json: use_dora:"),
    ({"modules_to_save": ["lm_head"]}, r"json: modules_to_save:"),
    ({"bias": "all"}, r"json: bias:"),
    ({"peft_type": "IA3"}, r"json: peft_type:"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"json: target_modules: 'lm_head'"),
    ({"target_modules": ["embed_tokens"]}, r"json: target_modules: 'embed_tokens'"),
    ({"r": 0}, r"json: r:"),
    # the tensors are rank 8, so a rank_pattern of 4 is a shape mismatch
    ({"rank_pattern": {"q_proj": 4}}, r"q_proj: lora_A \(8, 64\)"),
])
def test_bad_config(bad: Path, changes: dict, field: str) -> None:
    _edit_config(bad, **changes)
    with pytest.raises(AdapterError, match=field):
        _load(bad)


def test_shape_mismatch_other_base_model(bad: Path) -> None:
    shapes = dict(SHAPES, q_proj=(96, 96))
    with pytest.raises(AdapterError, match=r"q_proj.*different base model"):
        _load(bad, module_shapes=shapes)


def test_missing_and_pickle_only(bad: Path) -> None:
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"missing adapter_model\.safetensors"):
        _load(bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*pickle"):
        _load(bad)
    (bad / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"missing adapter_config\.json"):
        _load(bad)


def test_corrupt_safetensors(bad: Path) -> None:
    st = bad / "adapter_model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors.*corrupt"):
        _load(bad)
    st.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors"):
        _load(bad)


def _edit_tensors(path: Path, fn: Any) -> None:
    st = path / "adapter_model.safetensors"
    tensors = load_file(str(st))
    fn(tensors)
    save_file(tensors, str(st))


def test_unknown_key(bad: Path) -> None:
    _edit_tensors(bad, lambda t: t.update({"base_model.model.foo.weight": torch.zeros(2)}))
    with pytest.raises(AdapterError, match="foo"):
        _load(bad)


def test_lm_head_key(bad: Path) -> None:
    def add(t: dict) -> None:
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
        t["base_model.model.lm_head.lora_B.weight"] = torch.zeros(128, 8)
    _edit_tensors(bad, add)
    with pytest.raises(AdapterError, match="lm_head"):
        _load(bad)


def test_untargeted_key(bad: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    _edit_tensors(bad, lambda t: t.update({key: torch.zeros(8, 64)}))
    with pytest.raises(AdapterError, match=r"k_proj.*target_modules"):
        _load(bad)


def test_missing_b(bad: Path) -> None:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_tensors(bad, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=r"missing .*layers\.1\.self_attn\.v_proj\.lora_B"):
        _load(bad)


def test_non_finite(bad: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def poison(t: dict) -> None:
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
    _edit_tensors(bad, poison)
    with pytest.raises(AdapterError, match="non-finite"):
        _load(bad)


def test_fan_in_fan_out_is_harmless(adapters: dict, bad: Path) -> None:
    _edit_config(bad, fan_in_fan_out=True)
    a1 = _load(bad)
    a0 = _load(adapters["qv"][0])
    for k, (a, b, s) in a0.weights.items():
        torch.testing.assert_close(a1.weights[k][0], a)
        torch.testing.assert_close(a1.weights[k][1], b)
        assert a1.weights[k][2] == s


def test_resolve_adapter_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "good" / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert resolve_adapter_path(root, "good") == (root / "good").resolve()
    assert resolve_adapter_path(root, "good/sub") == (root / "good" / "sub").resolve()
    assert resolve_adapter_path(root, str(root / "good")) == (root / "good").resolve()
    assert resolve_adapter_path(root, "good/../good") == (root / "good").resolve()
    for req in ("../outside", "good/../../outside", str(outside), "/etc", "", "a\x00b"):
        with pytest.raises(AdapterError):
            resolve_adapter_path(root, req)
    os.symlink(outside, root / "link")
    with pytest.raises(AdapterError, match="outside"):
        resolve_adapter_path(root, "link")
    os.symlink(root / "good", root / "inner_link")
    assert resolve_adapter_path(root, "inner_link") == (root / "good").resolve()
