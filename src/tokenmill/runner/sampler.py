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

Randomness: the uniform for vocab column ``v`` of a row is a pure function of
``(seed, step, v)`` (SplitMix64 in int64 tensor ops), with ``step = len(output_token_ids)``.
So a request draws the same token whatever else is in the batch, wherever its row is, and on
any device, and there is no ``torch.Generator`` state to carry between steps.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tokenmill.kernels.cpu import cpu_kernels
from tokenmill.protocol import SamplingParams, TokenLogprob
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

# --------------------------------------------------------------------------------------------
# Counter-based RNG (SplitMix64). Python ints for the per-row key, int64 tensors per element.
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64 increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_SEED_SALT = 0x5851F42D4C957F2D
_UNIFORM_BITS = 23  # (2m + 1) / 2**24 is exact in float32 for m < 2**23, and never 0 or 1


def _to_int64(x: int) -> int:
    """The signed int64 with the same 64 bits as ``x mod 2**64``."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _mix64(x: int) -> int:
    """SplitMix64's output function on a Python int (exact, unsigned)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _MIX1) & _MASK64
    x ^= x >> 27
    x = (x * _MIX2) & _MASK64
    return x ^ (x >> 31)


def row_key(seed: int, step: int) -> int:
    """The 64-bit stream key (as a signed int64 value) of one request at one decode step.

    For a fixed seed, different steps give different keys (the mixer is a bijection), and
    likewise for a fixed step and different seeds.
    """
    return _to_int64(_mix64(_mix64(seed ^ _SEED_SALT) + (step + 1) * _GOLDEN))


def column_counters(vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(v + 1) * golden mod 2**64`` for every column, as int64: the SplitMix64 counters."""
    v = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=device)
    return v.mul_(_to_int64(_GOLDEN))  # int64 multiplication wraps mod 2**64


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float32 ``[B, V]``: element (b, v) = splitmix64(keys[b] + counters[v]).

    Only integer ops: ``>>`` on int64 is arithmetic, so each shift is masked to make it
    logical; multiplication wraps mod 2**64. The final xor-shift of SplitMix64 is skipped
    because it does not touch the top 23 bits, which are the ones used.
    """
    x = keys[:, None] + counters[None, :]
    t = torch.empty_like(x)
    torch.bitwise_right_shift(x, 30, out=t)
    x.bitwise_xor_(t.bitwise_and_((1 << 34) - 1))
    x.mul_(_to_int64(_MIX1))
    torch.bitwise_right_shift(x, 27, out=t)
    x.bitwise_xor_(t.bitwise_and_((1 << 37) - 1))
    x.mul_(_to_int64(_MIX2))
    x.bitwise_right_shift_(64 - _UNIFORM_BITS).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    u = x.to(torch.float32)
    return u.mul_(2.0 ** -_UNIFORM_BITS).add_(2.0 ** -(_UNIFORM_BITS + 1))


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


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


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row; None where params.logprobs is None


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


def _rows_or_all(idx: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    if len(idx) == total:
        return None
    return torch.tensor(idx, dtype=torch.int64, device=device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


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
        dev, V, B = self.device, self.vocab_size, len(rows)
        meta = SamplingMetadata(num_rows=B)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=dev)

        def flat_index(row_ids: list[int], token_lists: list[list[int]]) -> torch.Tensor:
            """row * V + token for every token of each row's list; ids outside [0, V) dropped."""
            lens = tensor([len(t) for t in token_lists])
            toks = tensor(list(itertools.chain.from_iterable(token_lists)))
            rws = torch.repeat_interleave(tensor(row_ids), lens)
            keep = (toks >= 0) & (toks < V)
            return (rws * V + toks)[keep]

        # Repetition penalty (prompt + output).
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            idx = flat_index(rep, [rows[i].prompt_token_ids + rows[i].output_token_ids
                                   for i in rep])
            pen = torch.tensor([r.params.repetition_penalty for r in rows],
                               dtype=torch.float32, device=dev)
            if idx.numel():
                meta.rep_index = idx
                meta.rep_penalty = pen[torch.div(idx, V, rounding_mode="floor")]

        # Frequency / presence penalties (output only).
        fp = [i for i, r in enumerate(rows)
              if (r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0)
              and r.output_token_ids]
        if fp:
            occ = flat_index(fp, [rows[i].output_token_ids for i in fp])
            uniq = torch.unique(occ)
            freq = torch.tensor([-r.params.frequency_penalty for r in rows],
                                dtype=torch.float32, device=dev)
            pres = torch.tensor([-r.params.presence_penalty for r in rows],
                                dtype=torch.float32, device=dev)
            meta.add_index = torch.cat([occ, uniq])
            meta.add_value = torch.cat([freq[torch.div(occ, V, rounding_mode="floor")],
                                        pres[torch.div(uniq, V, rounding_mode="floor")]])

        # min_new_tokens: mask stop ids.
        ms = [i for i, r in enumerate(rows)
              if len(r.output_token_ids) < r.params.min_new_tokens and r.stop_token_ids]
        if ms:
            idx = flat_index(ms, [rows[i].stop_token_ids for i in ms])
            if idx.numel():
                meta.mask_index = idx

        # Watermark: keyed by each row's previous token (the prompt's last one at first).
        wm = [i for i, r in enumerate(rows) if r.params.watermark]
        if wm:
            meta.watermark_rows = _rows_or_all(wm, B, dev)
            meta.watermark_keys = self.watermark.keys(
                [(rows[i].output_token_ids or rows[i].prompt_token_ids or [0])[-1] for i in wm],
                dev)

        # Sampled rows and their filters (indices relative to the sampled subset).
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        ns = len(sampled)
        meta.num_sampled = ns
        if ns:
            meta.sample_rows = _rows_or_all(sampled, B, dev)
            srows = [rows[i] for i in sampled]
            meta.keys = tensor([row_key(r.seed, len(r.output_token_ids)) for r in srows])
            if any(r.params.temperature != 1.0 for r in srows):
                meta.temperature = _column([r.params.temperature for r in srows], dev)

            top_p = [j for j, r in enumerate(srows) if r.params.top_p < 1.0]
            if top_p:
                meta.nucleus_rows = _rows_or_all(top_p, ns, dev)
                ks = [min(srows[j].params.top_k, V) for j in top_p]
                meta.nucleus_k = tensor(ks).unsqueeze(1)
                meta.nucleus_k_max = max(ks)
                meta.nucleus_p = _column([srows[j].params.top_p for j in top_p], dev)

            top_k = [j for j, r in enumerate(srows)
                     if 0 < r.params.top_k < V and r.params.top_p >= 1.0]
            if top_k:
                meta.topk_rows = _rows_or_all(top_k, ns, dev)
                ks = [srows[j].params.top_k for j in top_k]
                meta.topk_pos = tensor([k - 1 for k in ks]).unsqueeze(1)
                meta.topk_max = max(ks)

            typical = [j for j, r in enumerate(srows) if r.params.typical_p < 1.0]
            if typical:
                meta.typical_rows = _rows_or_all(typical, ns, dev)
                meta.typical_mass = _column([srows[j].params.typical_p for j in typical], dev)

            min_p = [j for j, r in enumerate(srows) if r.params.min_p > 0.0]
            if min_p:
                meta.min_p_rows = _rows_or_all(min_p, ns, dev)
                meta.min_p_log = _column([math.log(srows[j].params.min_p) for j in min_p], dev)

        # Logprobs.
        lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if lp:
            meta.logprob_rows = _rows_or_all(lp, B, dev)
            meta.logprob_counts = [r.params.logprobs for r in rows]
            meta.logprob_max = min(max(r.params.logprobs or 0 for r in rows), V)
        return meta

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
        x = x[:, : self.vocab_size]
        if self._kernels is not None and self._kernels.supports_argmax(x):
            return self._kernels.argmax(x)  # ~6x torch's on float32, ~25x on bfloat16
        return x.float().argmax(dim=-1)

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
