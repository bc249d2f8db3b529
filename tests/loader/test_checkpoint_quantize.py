"""A checkpoint's own quantization: a GGUF whose linear layers are all Q4_0/Q4_1 runs them as
w4a8 on the CPU (llama.cpp's arithmetic for those files) unless `--quantize` says otherwise;
every other checkpoint loads as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_gguf_writer import write_tiny_gguf

from tokenmill.config import ModelConfig
from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.layers.linear import Linear
from tokenmill.layers.quant import W4A8Weight, W8A8Weight
from tokenmill.loader import ModelSource, resolve_model
from tokenmill.runner.loading import checkpoint_quantize, load_model, resolve_quantize

_K = cpu_kernels()
VECTOR = _K is not None and _K.w4a8_vector  # AVX-512 VNNI or AVX2
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # (no CUDA needed to name it)
W4A8 = "w4a8" if VECTOR else None  # with the scalar loop alone the GGUF loads as it is


def _gguf(folder: Path, types: dict[str, str] | None) -> ModelSource:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.gguf"
    expected = write_tiny_gguf(path, linear_types=types)
    source = resolve_model(str(path))
    got = dict(source.iter_weights())  # the loader dequantizes what the writer quantized
    assert set(got) == set(expected)
    for name, w in expected.items():
        assert torch.equal(got[name], torch.from_numpy(w)), name
    return source


@pytest.mark.parametrize(("types", "want"), [
    ({"*": "Q4_1"}, W4A8),
    ({"*": "Q4_0"}, W4A8),
    ({"*": "Q4_1", "blk.1.ffn_down.weight": "Q8_0"}, None),  # one layer would lose bits
    ({"*": "Q8_0"}, None),
    (None, None),  # float32 weights
])
def test_the_gguf_weight_types_decide(tmp_path: Path, types: dict[str, str] | None,
                                      want: str | None) -> None:
    source = _gguf(tmp_path, types)
    assert checkpoint_quantize(source, CPU) == want
    assert checkpoint_quantize(source, CPU, "bfloat16") == want
    assert checkpoint_quantize(source, CUDA) is None  # the native kernels are the CPU's
    for precise in ("float32", "float16"):  # asked for: the dequantized weights' precision
        assert checkpoint_quantize(source, CPU, precise) is None


def test_the_flag_wins(tmp_path: Path) -> None:
    source = _gguf(tmp_path, {"*": "Q4_1"})
    assert resolve_quantize(ModelConfig(), source, CPU) == W4A8
    assert resolve_quantize(ModelConfig(quantize="none"), source, CPU) is None
    assert resolve_quantize(ModelConfig(quantize="int4"), source, CPU) == "int4"
    f32 = _gguf(tmp_path / "f32", None)
    assert resolve_quantize(ModelConfig(quantize="w4a8"), f32, CPU) == "w4a8"
    with pytest.raises(ValueError, match="unknown quantization"):
        ModelConfig(quantize="auto")


def test_a_safetensors_folder_loads_as_it_is(tmp_path: Path) -> None:
    source = ModelSource(model_id="m", path=tmp_path, format="hf")  # nothing is read
    assert checkpoint_quantize(source, CPU) is None


@pytest.mark.skipif(not VECTOR, reason="no AVX2 or VNNI: the default GGUF loads unquantized")
def test_the_default_model_runs_w4a8_unless_told_not_to() -> None:
    lm = load_model(ModelConfig(dtype="bfloat16"))
    assert lm.quantize == "w4a8"
    quant = {n: type(m.quant) for n, m in lm.model.named_modules() if isinstance(m, Linear)}
    assert quant.pop("lm_head") is W8A8Weight  # the tied Q8_0 embedding, int8 as in the GGUF
    assert quant and set(quant.values()) == {W4A8Weight}
    # The w4a8 layers never read a plain weight: none is kept; the tied head's is the embedding.
    kept = {n: m.weight.shape[0] for n, m in lm.model.named_modules() if isinstance(m, Linear)}
    assert kept.pop("lm_head") == 49152 and set(kept.values()) == {0}
    assert load_model(ModelConfig(dtype="float32")).quantize is None
    plain = load_model(ModelConfig(dtype="bfloat16", quantize="none"))
    assert plain.quantize is None
    linears = [m for m in plain.model.modules() if isinstance(m, Linear)]
    assert all(m.quant is None for m in linears)
    if torch.backends.mkldnn.is_available():  # dense: every weight in oneDNN's layout
        assert all(m.packed is not None for m in linears)
