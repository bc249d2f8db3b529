"""The device side of a step: SchedulerOutput → input tensors → forward → sample → RunnerOutput.

The runner keeps a small state per running request (its tokens and sampling settings), so the
scheduler only sends full request data when a request (re)enters the batch.
"""

from __future__ import annotations

import logging
import math
import mmap
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.engine.outputs import NewRequestData, RunnerOutput, ScheduledChunk, SchedulerOutput
from tokenmill.guided.backend import GrammarBackend, GrammarMatcher
from tokenmill.guided.bitmask import GrammarMasker, apply_bias_
from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.layers.attention import AttentionBackend
from tokenmill.lora.adapter import LoraAdapter
from tokenmill.lora.manager import LoraManager
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.protocol import SamplingParams, TokenLogprob
from tokenmill.runner.cuda_graphs import DecodeGraphs
from tokenmill.runner.sampler import Sampler, SamplingMetadata, SamplingRow
from tokenmill.runner.watermark import WatermarkBias

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
    matcher: GrammarMatcher | None = None  # constrained decoding: where its grammar stands


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
    # Grammar masks of the constrained sampled rows, computed while the model runs.
    grammar_job: Future[torch.Tensor] | None = None
    grammar_rows: torch.Tensor | None = None  # their sampled-row indices; None: all rows


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """A zeroed cache. Zeros matter: padded key slots are masked, but 0 * NaN garbage in V
    would still poison the output. On CPU an anonymous mmap gives zero pages lazily, so a
    cache sized from free RAM costs nothing until blocks are actually used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # No MADV_HUGEPAGE: with THP in "madvise" mode a first touch of a fresh 2 MB page may
    # compact memory on the spot, and one decode step of an offline run took ~1 s that way.
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, device: torch.device,
                 num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 watermark: WatermarkBias | None = None,
                 cuda_graphs: list[int] | None = None, max_model_len: int = 0) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks  # what the KV manager hands out
        buckets = [b for b in (cuda_graphs or []) if b > 0]
        use_graphs = bool(buckets) and device.type == "cuda" and backend.name == "triton"
        # With CUDA graphs one more block: the padding rows of a replay write their K/V there.
        self.kv_cache = allocate_kv_cache(
            model.kv_cache_shape(num_blocks + use_graphs, block_size, kv_dtype), kv_dtype,
            device)
        model.bind_kv_cache(self.kv_cache)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            width = -(-(max_model_len or num_blocks * block_size) // block_size)
            self.graphs = DecodeGraphs(model, device, buckets, width, num_blocks * block_size,
                                       model.cfg.sliding_window)
            if not self.graphs.capture():
                self.graphs = None
        self.sampler = Sampler(model.cfg.vocab_size, device, watermark)
        self.lora = LoraManager(model, device)  # costs nothing until an adapter is added
        if device.type == "cpu":
            cpu_kernels()  # build (or find cached) the native kernels now, not in a request
        self.states: dict[str, _ReqState] = {}
        # Constrained decoding: set by build_core; nothing is built until a request uses it.
        self.grammar: GrammarBackend | None = None
        self._masker: GrammarMasker | None = None
        self._constrained: set[str] = set()  # ids of running requests with a grammar

    # ---- LoRA adapters (the engine core registers them; the scheduler places them) ----------
    def read_adapter(self, name: str, path: str) -> LoraAdapter:
        """Read and check an adapter's files; safe off the engine loop's thread."""
        return self.lora.read(name, Path(path))

    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        self.lora.add(adapter)

    def remove_adapter(self, name: str) -> None:
        self.lora.remove(name)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        for slot, name in so.lora_loads:
            self.lora.activate(slot, name)
        self._update_states(so)
        out = RunnerOutput()
        if so.is_empty:
            return out
        chunks = so.chunks
        if self.lora.host and len(chunks) > 1:
            # Rows of one adapter side by side: equal runs then need no gather or scatter in
            # the LoRA matmuls (`make_plan`). Rows are independent, so order changes nothing.
            chunks = sorted(chunks, key=lambda c: self.states[c.request_id].lora_slot)
        batch = self._prepare_inputs(chunks)
        meta = self.backend.build_metadata(
            query_lens=[len(c.token_ids) for c in chunks],
            context_lens=[c.start + len(c.token_ids) for c in chunks],
            block_tables=[c.block_ids for c in chunks],
            block_size=self.block_size, sliding_window=self.model.cfg.sliding_window,
            device=self.device)
        # Every step: once the last adapter is unloaded, the linears keep their LoRA stacks
        # and must not see the previous step's plan.
        self.lora.set_batch([self.states[c.request_id].lora_slot for c in chunks
                             for _ in c.token_ids] if self.lora.host else None)
        ids = torch.tensor(batch.input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(batch.positions, dtype=torch.long, device=self.device)
        self._start_grammar_masks(batch)  # on a worker thread, overlapping the forward pass
        # The sampling tensors before the forward is queued: on a GPU their host-to-device
        # copies (and boolean indexing) wait for the stream, which is idle only now.
        smeta = self.sampler.prepare(self._sampling_rows(batch)) if batch.sample_rows else None
        hidden = None
        if self.graphs is not None and not (
                self.lora.host and any(self.states[c.request_id].lora_slot >= 0 for c in chunks)):
            hidden = self.graphs.run(ids, pos, meta)  # None unless a decode-only step fits
        if hidden is None:
            keep = sorted({*batch.sample_rows, *batch.plp_rows})
            some = len(keep) < len(batch.input_ids)  # a prefill: its other rows need no output
            hidden = self.model(ids, pos, meta, keep if some else None)
            if some:
                at = {row: i for i, row in enumerate(keep)}
                batch.sample_rows = [at[r] for r in batch.sample_rows]
                batch.plp_rows = [at[r] for r in batch.plp_rows]
        if batch.plp_rows:
            self._prompt_logprobs(hidden, batch, out)
        if smeta is not None:
            self._sample(hidden, batch, out, smeta)
        return out

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in (*so.finished_req_ids, *so.preempted_req_ids):
            self.states.pop(rid, None)
            self._constrained.discard(rid)
        for nr in so.new_requests:
            self.states[nr.request_id] = _ReqState(
                prompt=nr.prompt_token_ids, output=list(nr.output_token_ids), params=nr.params,
                seed=nr.seed, stop_token_ids=nr.stop_token_ids,
                want_prompt_logprobs=nr.params.prompt_logprobs is not None
                and not nr.output_token_ids,
                lora_slot=nr.lora_slot,
                matcher=self._new_matcher(nr) if nr.params.grammar is not None else None)

    def _prepare_inputs(self, chunks: list[ScheduledChunk]) -> _Batch:
        b = _Batch()
        for chunk in chunks:
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

    def _sampling_rows(self, b: _Batch) -> list[SamplingRow]:
        rows = []
        for rid in b.sample_ids:
            st = self.states[rid]
            # A grammar decides where EOS may come; min_new_tokens does not mask it then.
            rows.append(SamplingRow(
                params=st.params, seed=st.seed, prompt_token_ids=st.prompt,
                output_token_ids=st.output,
                stop_token_ids=st.stop_token_ids if st.matcher is None else []))
        return rows

    def _sample(self, hidden: torch.Tensor, b: _Batch, out: RunnerOutput,
                smeta: SamplingMetadata) -> None:
        rows = b.sample_rows  # ascending and distinct, so these two tests mean "all rows"
        # A decode step samples every row in order: no gather (an index op, slow this cold).
        picked = (hidden if len(rows) == hidden.shape[0] and rows[-1] == len(rows) - 1
                  else hidden[rows])
        logits = self.model.compute_logits(picked)  # the sampler widens it
        if b.grammar_job is not None and self._masker is not None:
            logits = logits.float()
            # Masked before the sampler, so reported logprobs are of the model's distribution
            # renormalized over what the grammar allows (vLLM's choice; TGI's are of the fully
            # processed distribution). Penalties and temperature stay out of them, as elsewhere.
            apply_bias_(logits, self._masker.bias(b.grammar_job), b.grammar_rows)
        result = self.sampler.sample(logits, smeta)
        for rid, tok, lp in zip(b.sample_ids, result.token_ids, result.logprobs):
            st = self.states[rid]
            st.output.append(tok)
            out.sampled[rid] = tok
            if st.matcher is not None:
                self._advance_grammar(rid, st.matcher, tok, lp)
            if lp is not None:
                out.logprobs[rid] = lp

    # ---- constrained decoding ------------------------------------------------------------------
    def _new_matcher(self, nr: NewRequestData) -> GrammarMatcher:
        if self.grammar is None or nr.params.grammar is None:
            raise RuntimeError("a constrained request reached a runner without a grammar backend")
        m = self.grammar.matcher(nr.params.grammar)
        self._constrained.add(nr.request_id)
        # A request resumed after preemption replays what it had generated.
        if nr.output_token_ids and not m.replay(nr.output_token_ids):
            logger.warning("request %s: grammar replay failed: %s", nr.request_id, m.error[:500])
        return m

    def _start_grammar_masks(self, b: _Batch) -> None:
        """Start computing the masks of this step's constrained rows (none: no work at all)."""
        if not self._constrained:
            return
        rows: list[int] = []
        matchers: list[GrammarMatcher] = []
        for j, rid in enumerate(b.sample_ids):
            m = self.states[rid].matcher
            if m is not None:
                rows.append(j)
                matchers.append(m)
        if not matchers or self.grammar is None:
            return
        if self._masker is None:
            self._masker = GrammarMasker(self.grammar, self.model.cfg.vocab_size, self.device)
        b.grammar_job = self._masker.start(matchers)
        if len(rows) < len(b.sample_ids):
            b.grammar_rows = torch.tensor(rows, dtype=torch.long, device=self.device)

    @staticmethod
    def _advance_grammar(rid: str, m: GrammarMatcher, tok: int, lp: TokenLogprob | None) -> None:
        if not m.consume(tok):  # only a grammar that hit a limit gets here: EOS comes next
            logger.warning("request %s: grammar error: %s", rid, m.error[:500])
        if lp is not None and lp.top:
            lp.top = [(t, v) for t, v in lp.top if v != -math.inf]  # tokens the grammar forbids

    def _prompt_logprobs(self, hidden: torch.Tensor, b: _Batch, out: RunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[b.plp_rows]).float()
        tgt = torch.tensor(b.plp_targets, dtype=torch.long, device=self.device)
        offset = 0
        for rid, n in b.plp_spans:
            num_top = self.states[rid].params.prompt_logprobs or 0
            out.prompt_logprobs[rid] = self.sampler.prompt_logprobs(
                logits[offset:offset + n], tgt[offset:offset + n], num_top)
            offset += n
