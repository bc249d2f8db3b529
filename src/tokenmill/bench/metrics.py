"""Percentiles and per-level summaries of request records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.bench.client import RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} not in [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class LevelSummary:
    """One concurrency level. Latencies in seconds; rates over the level's wall time."""

    concurrency: int
    requests: int  # completed without error
    errors: int
    duration_s: float
    prompt_tokens: int  # of the completed requests (the workload's count)
    output_tokens: int  # of the completed requests (the server's count where it gives one)
    output_tok_s: float
    req_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    e2e_p50: float
    e2e_p99: float
    tpot_mean: float  # mean over requests of (e2e - ttft) / (output tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}


def summarize(concurrency: int, records: Sequence[RequestRecord],
              duration_s: float) -> LevelSummary:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    itl = [g for r in ok for g in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.e2e is not None and r.ttft is not None and r.output_tokens > 1]
    out = sum(r.output_tokens for r in ok)
    rate = 1 / duration_s if duration_s > 0 else math.nan
    return LevelSummary(
        concurrency=concurrency, requests=len(ok), errors=len(records) - len(ok),
        duration_s=duration_s, prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=out, output_tok_s=out * rate, req_s=len(ok) * rate,
        ttft_p50=percentile(ttft, 50), ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99), itl_p50=percentile(itl, 50),
        itl_p99=percentile(itl, 99), e2e_p50=percentile(e2e, 50), e2e_p99=percentile(e2e, 99),
        tpot_mean=sum(tpot) / len(tpot) if tpot else math.nan)


# (field, higher is better) of the A/B comparison
RATIO_FIELDS = (("output_tok_s", True), ("req_s", True), ("ttft_p50", False),
                ("ttft_p99", False), ("itl_p50", False), ("e2e_p50", False))


def ratios(a: LevelSummary, b: LevelSummary) -> dict[str, float]:
    """A / B for each of RATIO_FIELDS (NaN where B is 0 or missing)."""
    out: dict[str, float] = {}
    for name, _ in RATIO_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        out[name] = x / y if y and not math.isnan(y) else math.nan
    return out
