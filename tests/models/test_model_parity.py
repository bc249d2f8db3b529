"""Every supported architecture: a tiny random model written with transformers gives the same
logits through our paged-cache path (chunked prefill + 16 decode steps) as transformers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmill.config import ModelConfig  # noqa: E402
from tokenmill.layers.attention import TorchPagedAttention  # noqa: E402
from tokenmill.runner.loading import load_model  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)

ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8,
                                                  tie_word_embeddings=False),
}


def make_tiny(arch: str, path: Path, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ARCHS[arch]()
    for name, value in overrides.items():  # e.g. head_dim=32 (the int8 KV cache's minimum)
        setattr(cfg, name, value)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Default init leaves some norms at 1 and biases at 0; perturb everything so every
    # weight's placement is checked.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(path)
    return model


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(arch: str, device: str, tmp_path: Path) -> None:
    ref = make_tiny(arch, tmp_path)
    lm = load_model(ModelConfig(model_id=str(tmp_path), dtype="float32", device=device))
    model = lm.model
    dev = torch.device(device)
    block_size, num_blocks = 4, 40
    cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size), device=dev)
    model.bind_kv_cache(cache)
    backend = TorchPagedAttention()
    # A scattered block table, so paging is really exercised.
    table = random.Random(0).sample(range(num_blocks), num_blocks)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (21,), generator=g).tolist()
    window = lm.model.cfg.sliding_window

    def run(start: int, chunk: list[int]) -> torch.Tensor:
        meta = backend.build_metadata([len(chunk)], [start + len(chunk)], [table], block_size,
                                      window, dev)
        with torch.inference_mode():
            h = model(torch.tensor(chunk, device=dev),
                      torch.arange(start, start + len(chunk), device=dev), meta)
            return model.compute_logits(h).cpu()

    def reference(seq: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return ref(torch.tensor([seq])).logits[0]

    # Prefill in two chunks: the second reads the first's K/V from the cache.
    ours = torch.cat([run(0, tokens[:9]), run(9, tokens[9:])])
    torch.testing.assert_close(ours, reference(tokens), atol=1e-4, rtol=1e-4)
    seq = list(tokens)
    for _ in range(16):
        nxt = int(ours[-1].argmax())
        ours = run(len(seq), [nxt])
        seq.append(nxt)
        torch.testing.assert_close(ours[0], reference(seq)[-1], atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_a_clear_error(tmp_path: Path) -> None:
    from tokenmill.loader import ModelLoadError

    make_tiny("llama", tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace("LlamaForCausalLM", "FancyForCausalLM")
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="FancyForCausalLM"):
        load_model(ModelConfig(model_id=str(tmp_path), dtype="float32", device="cpu"))
