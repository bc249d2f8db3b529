"""The sampler's per-step inputs: one `SamplingRow` per row of the batch (built by the model
runner), turned by `build_metadata` into small tensors once per step (`SamplingMetadata`).
Only per-row Python lists are walked here, never the vocabulary; a feature no row uses stays
`None` and costs the sampler nothing."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tokenmill.protocol import SamplingParams
from tokenmill.runner.sampling_rng import row_key
from tokenmill.runner.watermark import WatermarkBias

__all__ = ["SamplingMetadata", "SamplingRow", "build_metadata"]


@dataclass(slots=True)
class SamplingRow:
    """One row of this step's batch, built by the model runner."""

    params: SamplingParams
    seed: int  # always set; 0 <= seed < 2**64
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the token sampled now is number len(output_token_ids)
    stop_token_ids: list[int]  # EOS ids + params.stop_token_ids, masked before min_new_tokens


@dataclass
class SamplingMetadata:
    """Per-step tensors built by ``Sampler.prepare``. ``None`` marks an unused feature.

    ``*_rows`` fields index rows of the sampled subset (``None``: all of them); flat indices
    index the ``[num_rows * vocab_size]`` view of the batch's logits.
    """

    num_rows: int
    # Penalties and masks on the whole batch.
    rep_index: torch.Tensor | None = None  # flat (row, token) for prompt+output tokens
    rep_penalty: torch.Tensor | None = None  # penalty per rep_index entry
    add_index: torch.Tensor | None = None  # flat indices for frequency / presence penalties
    add_value: torch.Tensor | None = None  # -(frequency) per occurrence, -(presence) per token
    mask_index: torch.Tensor | None = None  # flat (row, stop id) masked by min_new_tokens
    watermark_rows: torch.Tensor | None = None  # batch rows with watermark; None: all of them
    watermark_keys: torch.Tensor | None = None  # [n] int64 hash keys of their previous tokens
    # Sampled rows (temperature > 0).
    num_sampled: int = 0
    sample_rows: torch.Tensor | None = None  # batch rows that sample; None: all rows
    keys: torch.Tensor | None = None  # [num_sampled] int64 RNG stream keys
    temperature: torch.Tensor | None = None  # [num_sampled, 1]; None: all 1.0
    # top_p rows, with their top_k: one descending sort (or top-M candidates on CPU).
    nucleus_rows: torch.Tensor | None = None
    nucleus_k: torch.Tensor | None = None  # [n, 1] top_k clamped to vocab_size; 0: none
    nucleus_p: torch.Tensor | None = None  # [n, 1]; None: no row uses top_p
    nucleus_k_max: int = 0
    # top_k rows without top_p use torch.topk.
    topk_rows: torch.Tensor | None = None
    topk_pos: torch.Tensor | None = None  # [n, 1] k - 1; None: unused
    topk_max: int = 0
    typical_rows: torch.Tensor | None = None
    typical_mass: torch.Tensor | None = None  # [n, 1]; None: unused
    min_p_rows: torch.Tensor | None = None
    min_p_log: torch.Tensor | None = None  # [n, 1] log(min_p); None: unused
    # Logprobs (raw distribution).
    logprob_rows: torch.Tensor | None = None  # batch rows that want logprobs; None: all
    logprob_counts: list[int | None] | None = None  # per batch row; None: no row wants them
    logprob_max: int = 0

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the raw logits' argmax: nothing to penalize, mask, draw or score."""
        return (self.num_sampled == 0 and self.logprob_counts is None and self.rep_index is None
                and self.add_index is None and self.mask_index is None
                and self.watermark_keys is None)


def _rows_or_all(idx: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    if len(idx) == total:
        return None
    return torch.tensor(idx, dtype=torch.int64, device=device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


@dataclass(frozen=True, slots=True)
class _Builder:
    device: torch.device
    vocab_size: int

    def tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def flat_index(self, row_ids: list[int], token_lists: list[list[int]]) -> torch.Tensor:
        """row * V + token for every token of each row's list; ids outside [0, V) dropped."""
        v = self.vocab_size
        lens = self.tensor([len(t) for t in token_lists])
        toks = self.tensor(list(itertools.chain.from_iterable(token_lists)))
        rws = torch.repeat_interleave(self.tensor(row_ids), lens)
        keep = (toks >= 0) & (toks < v)
        return (rws * v + toks)[keep]

    def row_of(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.div(flat, self.vocab_size, rounding_mode="floor")

    def per_row(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)


def build_metadata(rows: list[SamplingRow], vocab_size: int, device: torch.device,
                   watermark: WatermarkBias) -> SamplingMetadata:
    """This step's tensors, in the order the sampler applies them."""
    b = _Builder(device, vocab_size)
    meta = SamplingMetadata(num_rows=len(rows))
    _penalties(meta, rows, b)
    _watermark(meta, rows, b, watermark)
    _sampled(meta, rows, b)
    lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if lp:
        meta.logprob_rows = _rows_or_all(lp, len(rows), device)
        meta.logprob_counts = [r.params.logprobs for r in rows]
        meta.logprob_max = min(max(r.params.logprobs or 0 for r in rows), vocab_size)
    return meta


def _penalties(meta: SamplingMetadata, rows: list[SamplingRow], b: _Builder) -> None:
    """Repetition penalty (prompt + output), frequency / presence (output), and the stop ids
    masked until min_new_tokens."""
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        idx = b.flat_index(rep, [rows[i].prompt_token_ids + rows[i].output_token_ids
                                 for i in rep])
        if idx.numel():
            meta.rep_index = idx
            meta.rep_penalty = b.per_row([r.params.repetition_penalty for r in rows])[
                b.row_of(idx)]
    fp = [i for i, r in enumerate(rows)
          if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)
          and r.output_token_ids]
    if fp:
        occ = b.flat_index(fp, [rows[i].output_token_ids for i in fp])
        uniq = torch.unique(occ)
        freq = b.per_row([-r.params.frequency_penalty for r in rows])
        pres = b.per_row([-r.params.presence_penalty for r in rows])
        meta.add_index = torch.cat([occ, uniq])
        meta.add_value = torch.cat([freq[b.row_of(occ)], pres[b.row_of(uniq)]])
    ms = [i for i, r in enumerate(rows)
          if len(r.output_token_ids) < r.params.min_new_tokens and r.stop_token_ids]
    if ms:
        idx = b.flat_index(ms, [rows[i].stop_token_ids for i in ms])
        if idx.numel():
            meta.mask_index = idx


def _watermark(meta: SamplingMetadata, rows: list[SamplingRow], b: _Builder,
               watermark: WatermarkBias) -> None:
    """Keyed by each row's previous token (the prompt's last one at first)."""
    wm = [i for i, r in enumerate(rows) if r.params.watermark]
    if wm:
        meta.watermark_rows = _rows_or_all(wm, len(rows), b.device)
        meta.watermark_keys = watermark.keys(
            [(rows[i].output_token_ids or rows[i].prompt_token_ids or [0])[-1] for i in wm],
            b.device)


def _sampled(meta: SamplingMetadata, rows: list[SamplingRow], b: _Builder) -> None:
    """The rows that sample (temperature > 0), their RNG keys and filters; the filters'
    indices are relative to the sampled subset."""
    dev, v = b.device, b.vocab_size
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    ns = meta.num_sampled = len(sampled)
    if not ns:
        return
    meta.sample_rows = _rows_or_all(sampled, len(rows), dev)
    srows = [rows[i] for i in sampled]
    meta.keys = b.tensor([row_key(r.seed, len(r.output_token_ids)) for r in srows])
    if any(r.params.temperature != 1.0 for r in srows):
        meta.temperature = _column([r.params.temperature for r in srows], dev)
    top_p = [j for j, r in enumerate(srows) if r.params.top_p < 1.0]
    if top_p:
        meta.nucleus_rows = _rows_or_all(top_p, ns, dev)
        ks = [min(srows[j].params.top_k, v) for j in top_p]
        meta.nucleus_k = b.tensor(ks).unsqueeze(1)
        meta.nucleus_k_max = max(ks)
        meta.nucleus_p = _column([srows[j].params.top_p for j in top_p], dev)
    top_k = [j for j, r in enumerate(srows) if 0 < r.params.top_k < v and r.params.top_p >= 1.0]
    if top_k:
        meta.topk_rows = _rows_or_all(top_k, ns, dev)
        ks = [srows[j].params.top_k for j in top_k]
        meta.topk_pos = b.tensor([k - 1 for k in ks]).unsqueeze(1)
        meta.topk_max = max(ks)
    typical = [j for j, r in enumerate(srows) if r.params.typical_p < 1.0]
    if typical:
        meta.typical_rows = _rows_or_all(typical, ns, dev)
        meta.typical_mass = _column([srows[j].params.typical_p for j in typical], dev)
    min_p = [j for j, r in enumerate(srows) if r.params.min_p > 0.0]
    if min_p:
        meta.min_p_rows = _rows_or_all(min_p, ns, dev)
        meta.min_p_log = _column([math.log(srows[j].params.min_p) for j in min_p], dev)
