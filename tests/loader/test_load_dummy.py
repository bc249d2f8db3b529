"""`--load-format dummy`: random weights of a config's shapes with nothing read but config.json
and the tokenizer (benchmarks of large shapes without a download), and the GPU benchmark
script that uses it, run on the CPU with a tiny shape."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.llm import LLM
from tokenmill.loader import ModelLoadError, default_model_path
from tokenmill.protocol import SamplingParams
from tokenmill.runner.loading import init_dummy_weights

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config-only")
    gguf = default_model_path()
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)))
    return path


def test_unknown_load_format_and_bad_graph_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown load format"):
        ModelConfig(load_format="npz")
    with pytest.raises(ValueError, match="cuda_graphs"):
        ModelConfig(cuda_graphs=[1, -2])
    assert ModelConfig(cuda_graphs=[0]).cuda_graphs == [0]  # TGI's "0": none


def test_a_folder_without_weights_needs_dummy(config_only: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        LLM(str(config_only), max_batch_total_tokens=1024)
    llm = LLM(str(config_only), load_format="dummy", dtype="float32",
              max_batch_total_tokens=1024)
    out = llm.generate([5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                 ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and all(0 <= t < 49152 for t in out.token_ids)
    assert gc.get_freeze_count() > 0  # start-up objects kept out of full collections
    again = LLM(str(config_only), load_format="dummy", dtype="float32",
                max_batch_total_tokens=1024)  # the same seed: the same weights
    assert again.generate([5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0.0,
                                                    ignore_eos=True))[0].token_ids == out.token_ids


def test_dummy_weights_by_kind() -> None:
    model = torch.nn.ModuleDict({"input_layernorm": torch.nn.LayerNorm(8),
                                 "proj": torch.nn.Linear(8, 300)})
    init_dummy_weights(model, seed=3)
    assert torch.equal(model["input_layernorm"].weight, torch.ones(8))
    assert not model["input_layernorm"].bias.any() and not model["proj"].bias.any()
    std = float(model["proj"].weight.detach().std())
    assert 0.015 < std < 0.025


def test_gpu_benchmark_script_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_decode.py"), "--device", "cpu",
         "--shapes", "tiny", "--concurrency", "1,3", "--new-tokens", "3", "--decode-tokens", "5",
         "--max-batch-total-tokens", "2048", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| tiny |" in res.stdout and "copy bandwidth" in res.stdout
    data = json.loads(out.read_text())
    r = data["results"][0]
    assert r["shape"] == "tiny" and r["weight_bytes"] > 0 and r["decode_step_ms"] > 0
    assert set(r["throughput"]) == {"1", "3"} and all(v > 0 for v in r["throughput"].values())
    assert r["ratio"] == pytest.approx(r["decode_step_ms"] / r["roofline_ms"])
