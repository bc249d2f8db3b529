"""The device side of a step: SchedulerOutput → input tensors → forward → sample → RunnerOutput.

The runner keeps a small state per running request (its tokens and sampling settings), so the
scheduler only sends full request data when a request (re)enters the batch.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput
from tokenmill.layers.attention import AttentionBackend
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
        self.states: dict[str, _ReqState] = {}

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        for rid in (*so.finished_req_ids, *so.preempted_req_ids):
            self.states.pop(rid, None)
        for nr in so.new_requests:
            self.states[nr.request_id] = _ReqState(
                prompt=nr.prompt_token_ids, output=list(nr.output_token_ids), params=nr.params,
                seed=nr.seed, stop_token_ids=nr.stop_token_ids,
                want_prompt_logprobs=nr.params.prompt_logprobs is not None
                and not nr.output_token_ids)
        out = RunnerOutput()
        if so.is_empty:
            return out

        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []  # flat index of the last token of each sampled chunk
        sample_ids: list[str] = []
        plp_rows: list[int] = []  # flat indices whose logits score the next prompt token
        plp_targets: list[int] = []
        plp_spans: list[tuple[str, int]] = []
        for chunk in so.chunks:
            base = len(input_ids)
            n = len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + n))
            if chunk.sample:
                sample_rows.append(base + n - 1)
                sample_ids.append(chunk.request_id)
            st = self.states[chunk.request_id]
            if st.want_prompt_logprobs:
                last = min(chunk.start + n, len(st.prompt) - 1)  # targets exist up to here
                rows = list(range(base, base + max(0, last - chunk.start)))
                plp_rows.extend(rows)
                plp_targets.extend(st.prompt[chunk.start + 1: chunk.start + 1 + len(rows)])
                plp_spans.append((chunk.request_id, len(rows)))

        meta = self.backend.build_metadata(
            query_lens=[len(c.token_ids) for c in so.chunks],
            context_lens=[c.start + len(c.token_ids) for c in so.chunks],
            block_tables=[c.block_ids for c in so.chunks],
            block_size=self.block_size, sliding_window=self.model.cfg.sliding_window,
            device=self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, meta)

        if plp_rows:
            self._prompt_logprobs(hidden, plp_rows, plp_targets, plp_spans, out)
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows]).float()
            rows = []
            for rid in sample_ids:
                st = self.states[rid]
                rows.append(SamplingRow(params=st.params, seed=st.seed,
                                        prompt_token_ids=st.prompt, output_token_ids=st.output,
                                        stop_token_ids=st.stop_token_ids))
            result = self.sampler.sample(logits, self.sampler.prepare(rows))
            for rid, tok, lp in zip(sample_ids, result.token_ids, result.logprobs):
                self.states[rid].output.append(tok)
                out.sampled[rid] = tok
                if lp is not None:
                    out.logprobs[rid] = lp
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: list[int], targets: list[int],
                         spans: list[tuple[str, int]], out: RunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[rows]).float()
        tgt = torch.tensor(targets, dtype=torch.long, device=self.device)
        offset = 0
        for rid, n in spans:
            num_top = self.states[rid].params.prompt_logprobs or 0
            out.prompt_logprobs[rid] = self.sampler.prompt_logprobs(
                logits[offset:offset + n], tgt[offset:offset + n], num_top)
            offset += n
