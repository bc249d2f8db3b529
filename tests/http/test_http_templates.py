"""Chat templates that raise, loop or try to escape the sandbox (checklist 16, 17), served by
a tiny random model whose template the test writes."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2 as httpx
import pytest
from server_proc import ServerProcess

transformers = pytest.importorskip("transformers")

TEMPLATE = """{%- for m in messages -%}
{%- if m.content == 'boom' -%}{{ raise_exception('the template refuses boom') }}{%- endif -%}
{%- if m.content == 'spin' -%}{%- for i in range(100000) -%}{%- for j in range(100000) -%}
{%- endfor -%}{%- endfor -%}{%- endif -%}
{%- if m.content == 'escape' -%}{{ ''.__class__.__mro__[1].__subclasses__() }}{%- endif -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


@pytest.fixture(scope="module")
def template_server(tmp_path_factory):
    import torch

    from tokenmill.loader import default_model_path

    gguf = default_model_path()
    path: Path = tmp_path_factory.mktemp("tiny-template")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512,
                                   eos_token_id=2, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    s = ServerProcess("--model-id", str(path), "--max-batch-total-tokens", "2048")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def chat(url: str, content: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tgi", "max_tokens": 3, "messages": [{"role": "user", "content": content}]})


def test_template_errors_are_422_and_server_survives(template_server) -> None:
    url = template_server.url
    r = chat(url, "boom")
    assert r.status_code == 422 and "the template refuses boom" in r.text
    t0 = time.perf_counter()
    r = chat(url, "spin")
    assert r.status_code == 422 and time.perf_counter() - t0 < 10
    r = chat(url, "escape")
    assert r.status_code == 422
    assert chat(url, "hello").status_code == 200
    r = httpx.post(f"{url}/chat_tokenize", timeout=60, json={
        "model": "tgi", "messages": [{"role": "user", "content": "hello"}]})
    assert r.json()["templated_text"].startswith("<|im_start|>user\nhello<|im_end|>")
