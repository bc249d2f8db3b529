"""The device side of a step: SchedulerOutput → input tensors → forward → sample → RunnerOutput.

The runner keeps a small state per running request (its tokens and sampling settings), so the
scheduler only sends full request data when a request (re)enters the batch.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field

import torch

from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput
from tokenmill.layers.attention import AttentionBackend
from tokenmill.lora.manager import LoraManager
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.protocol import SamplingParams
from tokenmill.runner.sampler import Sampler, SamplingRow

logger = logging.getLogger("tokenmill.runner")


@dataclass(slots=True)
class _ReqState:
    prompt: list[int]
    output: list[int]
    params: SamplingParams
    seed: int
    stop_token_ids: list[int]
    want_prompt_logprobs: bool
    lora_slot: int = -1  # the request's adapter slot, -1 for the base model


@dataclass(slots=True)
class _Batch:
    """Flat inputs of one step, and which rows of the output matter."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # last token of each sampled chunk
    sample_ids: list[str] = field(default_factory=list)
    plp_rows: list[int] = field(default_factory=list)  # rows that score a prompt token
    plp_targets: list[int] = field(default_factory=list)
    plp_spans: list[tuple[str, int]] = field(default_factory=list)


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """A zeroed cache. Zeros matter: padded key slots are masked, but 0 * NaN garbage in V
    would still poison the output. On CPU an anonymous mmap gives zero pages lazily, so a
    cache sized from free RAM costs nothing until blocks are actually used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device,
                 num_blocks: int, block_size: int, kv_dtype: torch.dtype) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(model.kv_cache_shape(num_blocks, block_size),
                                          kv_dtype, device)
        model.bind_kv_cache(self.kv_cache)
        self.sampler = Sampler(model.cfg.vocab_size, device)
        self.lora: LoraManager | None = None  # set when LoRA adapters are loaded
        self.states: dict[str, _ReqState] = {}

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self._update_states(so)
        out = RunnerOutput()
        if so.is_empty:
            return out
        batch = self._prepare_inputs(so)
        meta = self.backend.build_metadata(
            query_lens=[len(c.token_ids) for c in so.chunks],
            context_lens=[c.start + len(c.token_ids) for c in so.chunks],
            block_tables=[c.block_ids for c in so.chunks],
            block_size=self.block_size, sliding_window=self.model.cfg.sliding_window,
            device=self.device)
        if self.lora is not None:
            self.lora.set_batch([self.states[c.request_id].lora_slot
                                 for c in so.chunks for _ in c.token_ids])
        ids = torch.tensor(batch.input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, meta)
        if batch.plp_rows:
            self._prompt_logprobs(hidden, batch, out)
        if batch.sample_rows:
            self._sample(hidden, batch, out)
        return out

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in (*so.finished_req_ids, *so.preempted_req_ids):
            self.states.pop(rid, None)
        for nr in so.new_requests:
            self.states[nr.request_id] = _ReqState(
                prompt=nr.prompt_token_ids, output=list(nr.output_token_ids), params=nr.params,
                seed=nr.seed, stop_token_ids=nr.stop_token_ids,
                want_prompt_logprobs=nr.params.prompt_logprobs is not None
                and not nr.output_token_ids,
                lora_slot=self.lora.slot_of(nr.adapter_id) if self.lora is not None else -1)

    def _prepare_inputs(self, so: SchedulerOutput) -> _Batch:
        b = _Batch()
        for chunk in so.chunks:
            base, n = len(b.input_ids), len(chunk.token_ids)
            b.input_ids.extend(chunk.token_ids)
            b.positions.extend(range(chunk.start, chunk.start + n))
            if chunk.sample:
                b.sample_rows.append(base + n - 1)
                b.sample_ids.append(chunk.request_id)
            st = self.states[chunk.request_id]
            if st.want_prompt_logprobs:
                # Row i scores prompt token start + i + 1, which exists up to the prompt's end.
                k = max(0, min(chunk.start + n, len(st.prompt) - 1) - chunk.start)
                b.plp_rows.extend(range(base, base + k))
                b.plp_targets.extend(st.prompt[chunk.start + 1:chunk.start + 1 + k])
                b.plp_spans.append((chunk.request_id, k))
        return b

    def _sample(self, hidden: torch.Tensor, b: _Batch, out: RunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[b.sample_rows]).float()
        rows = []
        for rid in b.sample_ids:
            st = self.states[rid]
            rows.append(SamplingRow(params=st.params, seed=st.seed, prompt_token_ids=st.prompt,
                                    output_token_ids=st.output,
                                    stop_token_ids=st.stop_token_ids))
        result = self.sampler.sample(logits, self.sampler.prepare(rows))
        for rid, tok, lp in zip(b.sample_ids, result.token_ids, result.logprobs):
            self.states[rid].output.append(tok)
            out.sampled[rid] = tok
            if lp is not None:
                out.logprobs[rid] = lp

    def _prompt_logprobs(self, hidden: torch.Tensor, b: _Batch, out: RunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[b.plp_rows]).float()
        tgt = torch.tensor(b.plp_targets, dtype=torch.long, device=self.device)
        offset = 0
        for rid, n in b.plp_spans:
            num_top = self.states[rid].params.prompt_logprobs or 0
            out.prompt_logprobs[rid] = self.sampler.prompt_logprobs(
                logits[offset:offset + n], tgt[offset:offset + n], num_top)
            offset += n
