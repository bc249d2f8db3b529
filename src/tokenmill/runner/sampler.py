"""Vectorized token sampler: penalties, filters, counter-based randomness, logprobs.

One ``Sampler.sample`` call handles a whole batch. Per-row settings become small tensors in
``Sampler.prepare`` (once per step); the work on ``[B, V]`` logits is batched torch ops, and
a feature no row uses costs nothing (its metadata is ``None``).

Order of operations, on float32 logits restricted to the first ``vocab_size`` columns:

1. logprobs (if asked for) from the RAW logits: ``log_softmax`` before anything below.
2. repetition penalty (HF/TGI) over prompt and output tokens, then frequency / presence
   penalties (OpenAI/vLLM) over output tokens, then the ``min_new_tokens`` stop-token mask,
   then the watermark's green-list bias on rows that ask for it (``runner/watermark.py``).
3. greedy rows (temperature 0): ``argmax``.
4. sampled rows: temperature, top_k, top_p, typical_p, min_p (HF warper semantics, in that
   order), then the Gumbel-max trick with counter-based noise.

Randomness is counter-based (``runner/sampling_rng.py``): a request draws the same token
whatever else is in the batch. The per-step inputs are built in ``runner/sampling_metadata.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.protocol import TokenLogprob
from tokenmill.runner.sampling_metadata import SamplingMetadata, SamplingRow, build_metadata
from tokenmill.runner.sampling_rng import column_counters, counter_uniform, row_key
from tokenmill.runner.watermark import WatermarkBias

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "column_counters",
    "counter_uniform",
    "row_key",
]


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row; None where params.logprobs is None


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put(x: torch.Tensor, rows: torch.Tensor | None, sub: torch.Tensor) -> None:
    if rows is not None:
        x.index_copy_(0, rows, sub)


class Sampler:
    """Turns one step's logits into one token per row (plus logprobs)."""

    #: CPU only: top_p first looks at this many top candidates before sorting a whole row.
    nucleus_candidates: int = 256
    #: CPU only: the noise is generated this many elements at a time, to stay in cache.
    noise_chunk_elems: int = 1 << 18
    #: prompt_logprobs works on this many logits at a time.
    prompt_chunk_elems: int = 1 << 24

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu",
                 watermark: WatermarkBias | None = None) -> None:
        if vocab_size < 1:
            raise ValueError("vocab_size must be positive")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._counters = column_counters(vocab_size, self.device)
        self.watermark = watermark or WatermarkBias()
        self._kernels = cpu_kernels() if self.device.type == "cpu" else None

    # ---------------------------------------------------------------- metadata

    def prepare(self, rows: list[SamplingRow]) -> SamplingMetadata:
        """Build this step's tensors. Only small per-row Python lists; no vocab-sized loops."""
        return build_metadata(rows, self.vocab_size, self.device, self.watermark)

    # ---------------------------------------------------------------- logits processing

    def _float_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A fresh contiguous float32 copy of the first vocab_size columns."""
        if logits.dim() != 2 or logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits must be [B, >= {self.vocab_size}], got {tuple(logits.shape)}")
        x = torch.empty((logits.shape[0], self.vocab_size), dtype=torch.float32,
                        device=logits.device)
        return x.copy_(logits[:, : self.vocab_size])

    @staticmethod
    def _penalize(x: torch.Tensor, meta: SamplingMetadata) -> None:
        """Penalties and the stop mask, in place on the whole batch."""
        flat = x.view(-1)
        if meta.rep_index is not None and meta.rep_penalty is not None:
            v = flat[meta.rep_index]
            v = torch.where(v > 0, v / meta.rep_penalty, v * meta.rep_penalty)
            flat.index_put_((meta.rep_index,), v)  # duplicates write equal values
        if meta.add_index is not None and meta.add_value is not None:
            flat.index_add_(0, meta.add_index, meta.add_value)
        if meta.mask_index is not None:
            flat.index_fill_(0, meta.mask_index, float("-inf"))

    def _nucleus_threshold(
        self, x: torch.Tensor, k: torch.Tensor, p: torch.Tensor, k_max: int
    ) -> torch.Tensor:
        """Per-row logit threshold ``[n, 1]`` of top_k followed by top_p (HF semantics).

        Both filters keep a prefix of the row sorted descending, so each reduces to "keep
        logits >= the last kept value" (ties at the boundary are all kept). HF removes a token
        when the ascending cumulative mass up to it is <= 1 - top_p; equivalently, in
        descending order, when the mass strictly before it is >= top_p.

        On CPU a full sort of a 50k vocabulary costs ~2 ms per row, while the nucleus is
        usually far smaller, so the first ``nucleus_candidates`` values come from ``topk``
        and only rows whose nucleus reaches past them are sorted in full. Elsewhere (GPU)
        one full sort, with no host synchronization.
        """
        V = x.shape[1]
        m = V
        if x.device.type == "cpu":
            m = min(V, max(self.nucleus_candidates, 2 * k_max))
        thresh, covered = self._nucleus_part(x, k, p, m)
        if m < V:
            missing = (~covered).nonzero().squeeze(1)  # host sync: free on CPU
            if missing.numel():
                full, _ = self._nucleus_part(x[missing], k[missing], p[missing], V)
                thresh[missing] = full
        return thresh

    @staticmethod
    def _nucleus_part(
        x: torch.Tensor, k: torch.Tensor, p: torch.Tensor, m: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Threshold from the top ``m`` values, and whether those were enough, per row."""
        V = x.shape[1]
        if m < V:
            vals = torch.topk(x, m, dim=-1, sorted=True).values
        else:
            vals = torch.sort(x, dim=-1, descending=True).values
        has_k = k > 0
        kth = vals.gather(1, (k - 1).clamp(min=0))
        vals.masked_fill_((vals < kth) & has_k, float("-inf"))
        # Rows with top_k (k <= m) have all their mass among the candidates; the others
        # normalize over the whole row.
        lse = torch.where(has_k, torch.logsumexp(vals, dim=-1, keepdim=True),
                          torch.logsumexp(x, dim=-1, keepdim=True))
        probs = (vals - lse).exp_()
        cum = probs.cumsum(dim=-1)
        n_keep = (cum - probs < p).sum(dim=-1, keepdim=True).clamp_(min=1)
        thresh = vals.gather(1, n_keep - 1)
        covered = (n_keep < m) | (cum[:, -1:] >= p) | has_k | (m == V)
        return thresh, covered.squeeze(1)

    def _filter(self, x: torch.Tensor, meta: SamplingMetadata) -> None:
        """Temperature and the top_k / top_p / typical_p / min_p filters, in place."""
        neg_inf = float("-inf")
        V = x.shape[1]
        if meta.temperature is not None:
            x.div_(meta.temperature)

        if meta.nucleus_p is not None and meta.nucleus_k is not None:
            sub = _take(x, meta.nucleus_rows)
            thresh = self._nucleus_threshold(sub, meta.nucleus_k, meta.nucleus_p,
                                             meta.nucleus_k_max)
            sub.masked_fill_(sub < thresh, neg_inf)
            _put(x, meta.nucleus_rows, sub)

        if meta.topk_pos is not None:
            sub = _take(x, meta.topk_rows)
            top = torch.topk(sub, meta.topk_max, dim=-1, sorted=True).values
            sub.masked_fill_(sub < top.gather(1, meta.topk_pos), neg_inf)
            _put(x, meta.topk_rows, sub)

        if meta.typical_mass is not None:
            # HF TypicalLogitsWarper: keep the tokens whose surprisal is closest to the
            # entropy until their mass reaches typical_p (the crossing token included).
            sub = _take(x, meta.typical_rows)
            logp = torch.log_softmax(sub, dim=-1)
            ent = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
            shifted = (logp.neg() - ent).abs_()
            s_shift, order = torch.sort(shifted, dim=-1)
            cum = logp.gather(1, order).exp_().cumsum_(dim=-1)
            last = (cum < meta.typical_mass).sum(dim=-1, keepdim=True).clamp_(max=V - 1)
            sub.masked_fill_(shifted > s_shift.gather(1, last), neg_inf)
            _put(x, meta.typical_rows, sub)

        if meta.min_p_log is not None:
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p): no softmax needed.
            sub = _take(x, meta.min_p_rows)
            thresh = sub.amax(dim=-1, keepdim=True) + meta.min_p_log
            sub.masked_fill_(sub < thresh, neg_inf)
            _put(x, meta.min_p_rows, sub)

    def _process(
        self, logits: torch.Tensor, meta: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(penalized logits [B, V], filtered logits of the sampled rows, raw logprobs)."""
        if logits.shape[0] != meta.num_rows:
            raise ValueError(f"logits have {logits.shape[0]} rows, metadata {meta.num_rows}")
        x = self._float_logits(logits)
        raw_lp = None
        if meta.logprob_counts is not None:
            raw_lp = torch.log_softmax(_take(x, meta.logprob_rows), dim=-1)
        self._penalize(x, meta)
        if meta.watermark_keys is not None:
            self.watermark.apply(x, meta.watermark_rows, meta.watermark_keys, self._counters)
        xs = None
        if meta.num_sampled:
            # When every row samples, filter in place: the penalized copy is not needed after.
            xs = x if meta.sample_rows is None else x.index_select(0, meta.sample_rows)
            self._filter(xs, meta)
        return x, xs, raw_lp

    def processed_logits(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The logits each row is drawn from, ``[B, vocab_size]`` float32 (-inf: filtered out).

        Greedy rows: penalized and masked logits (the token is their argmax). Sampled rows:
        additionally divided by the temperature and filtered. For inspection and tests.
        """
        x, xs, _ = self._process(logits, meta)
        if xs is not None and meta.sample_rows is not None:
            x.index_copy_(0, meta.sample_rows, xs)
        return x  # when every row samples, xs is x, filtered in place

    # ---------------------------------------------------------------- sampling

    def _add_gumbel(self, x: torch.Tensor, keys: torch.Tensor) -> None:
        """x += Gumbel noise, in place: -log(-log u) with u = counter_uniform(keys, columns)."""
        n = x.shape[0]
        rows = n
        if x.device.type == "cpu":  # row blocks that fit in cache; one block elsewhere
            rows = max(1, self.noise_chunk_elems // self.vocab_size)
        for r in range(0, n, rows):
            u = counter_uniform(keys[r : r + rows], self._counters)
            x[r : r + rows].sub_(u.log_().neg_().log_())  # -log u ~ Exp(1); -log of it: Gumbel

    def _argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's first largest among its first vocab_size columns, as int64 [B]."""
        if self._kernels is not None and self._kernels.supports_argmax(x):
            # ~6x torch's on float32, ~25x on bfloat16; no slice (a view op, slow when cold)
            return self._kernels.argmax(x, self.vocab_size)
        return x[:, : self.vocab_size].float().argmax(dim=-1)

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """One token per row. ``logits``: ``[B, V']`` with ``V' >= vocab_size``, any float dtype."""
        if meta.plain_greedy:  # the argmax straight off the model's logits: no float32 copy
            if logits.shape[0] != meta.num_rows or logits.shape[-1] < self.vocab_size:
                raise ValueError(f"logits {tuple(logits.shape)} for {meta.num_rows} rows")
            return SamplerOutput(token_ids=self._argmax(logits).tolist(),
                                 logprobs=[None] * meta.num_rows)
        x, xs, raw_lp = self._process(logits, meta)
        if xs is None:
            tokens = self._argmax(x)
        else:
            assert meta.keys is not None
            # Gumbel-max: argmax(l - log(-log u)); -log u is Exp(1), so log of it is -Gumbel.
            self._add_gumbel(xs, meta.keys)
            drawn = self._argmax(xs)
            if meta.sample_rows is None:
                tokens = drawn
            else:
                tokens = self._argmax(x)
                tokens.index_copy_(0, meta.sample_rows, drawn)

        logprobs: list[TokenLogprob | None] = [None] * meta.num_rows
        if raw_lp is None or meta.logprob_counts is None:
            return SamplerOutput(token_ids=tokens.tolist(), logprobs=logprobs)

        lp_tokens = _take(tokens, meta.logprob_rows)
        chosen = raw_lp.gather(1, lp_tokens.unsqueeze(1)).squeeze(1)
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        if meta.logprob_max > 0:
            top = torch.topk(raw_lp, meta.logprob_max, dim=-1, sorted=True)
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        token_list: list[int] = tokens.tolist()
        chosen_list: list[float] = chosen.tolist()
        lp_rows = [i for i, n in enumerate(meta.logprob_counts) if n is not None]
        for j, i in enumerate(lp_rows):
            n = meta.logprob_counts[i] or 0
            pairs = list(zip(top_ids[j][:n], top_vals[j][:n])) if n else []
            logprobs[i] = TokenLogprob(token_id=token_list[i], logprob=chosen_list[j], top=pairs)
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)

    def prompt_logprobs(
        self, logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
    ) -> list[TokenLogprob]:
        """Logprob of each next prompt token (raw distribution) and the top ``num_top``.

        ``logits``: ``[N, V']`` for N prompt positions; ``target_ids``: ``[N]``. Works in
        chunks so a long prompt does not materialize ``N x V`` float32 at once.
        """
        n = logits.shape[0]
        if target_ids.shape != (n,):
            raise ValueError("target_ids must be [N] for logits [N, V]")
        num_top = min(max(num_top, 0), self.vocab_size)
        chunk = max(1, self.prompt_chunk_elems // self.vocab_size)
        targets = target_ids.to(device=logits.device, dtype=torch.int64)
        chosen_parts, val_parts, id_parts = [], [], []
        for start in range(0, n, chunk):
            lp = torch.log_softmax(self._float_logits(logits[start : start + chunk]), dim=-1)
            tgt = targets[start : start + chunk]
            valid = (tgt >= 0) & (tgt < self.vocab_size)
            got = lp.gather(1, tgt.clamp(0, self.vocab_size - 1).unsqueeze(1)).squeeze(1)
            chosen_parts.append(got.masked_fill_(~valid, float("-inf")))  # id outside lm_head
            if num_top:
                top = torch.topk(lp, num_top, dim=-1, sorted=True)
                val_parts.append(top.values)
                id_parts.append(top.indices)
        if n == 0:
            return []
        chosen: list[float] = torch.cat(chosen_parts).tolist()
        ids: list[int] = targets.tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        if num_top:
            tv: list[list[float]] = torch.cat(val_parts).tolist()
            ti: list[list[int]] = torch.cat(id_parts).tolist()
            tops = [list(zip(a, b)) for a, b in zip(ti, tv)]
        return [TokenLogprob(token_id=t, logprob=c, top=p) for t, c, p in zip(ids, chosen, tops)]
