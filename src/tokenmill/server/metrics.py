"""Prometheus metrics under TGI's names, plus KV-cache and prefix-cache figures.

TGI's counters are exposed without the `_total` suffix prometheus_client adds to Counter, so
counters are kept and rendered here; histograms and gauges use
prometheus_client directly (their exposition already matches TGI's).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

# TGI: 35 geometric buckets starting at 0.15 ms for every *_duration histogram.
DURATION_BUCKETS = [0.00015 * 1.5**k for k in range(35)]


def _linear(limit: int, n: int = 100) -> list[float]:
    step = max(1, limit // n)
    return [float(step * (i + 1)) for i in range(n)]


class _Counters:
    """Counters under their exact TGI names (`# TYPE tgi_request_count counter`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, float] = defaultdict(float)
        self.labelled: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
        self.docs: dict[str, str] = {}

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            for name, doc in self.docs.items():
                lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
                if name in self.labelled:
                    lines += [f'{name}{{{k}="{v}"}} {n}'
                              for (k, v), n in self.labelled[name].items()]
                else:
                    lines.append(f"{name} {self.values[name]}")
        return "\n".join(lines) + "\n"


class Metrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int) -> None:
        self.registry = CollectorRegistry()
        self._c = _Counters()
        for name, doc in (
            ("tgi_request_count", "Requests received"),
            ("tgi_request_success", "Requests that completed"),
            ("tgi_request_failure", "Requests that failed, by error type"),
            ("tokenmill_preemptions", "Sequences preempted (recomputed later) by the scheduler"),
        ):
            self._c.docs[name] = doc
        self._c.labelled["tgi_request_failure"] = {}

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=self.registry)

        self.duration = hist("tgi_request_duration", "End-to-end request time (s)",
                             DURATION_BUCKETS)
        self.validation = hist("tgi_request_validation_duration",
                               "Validation and tokenization time (s)", DURATION_BUCKETS)
        self.queue = hist("tgi_request_queue_duration",
                          "Time from submission to the first generated token (s)",
                          DURATION_BUCKETS)
        self.inference = hist("tgi_request_inference_duration",
                              "Time from the first to the last generated token (s)",
                              DURATION_BUCKETS)
        self.per_token = hist("tgi_request_mean_time_per_token_duration",
                              "Mean time between generated tokens (s)", DURATION_BUCKETS)
        self.input_length = hist("tgi_request_input_length", "Prompt tokens per request",
                                 _linear(max_input_tokens))
        self.generated = hist("tgi_request_generated_tokens", "Generated tokens per request",
                              _linear(max_total_tokens))
        self.max_new = hist("tgi_request_max_new_tokens", "max_new_tokens per request",
                            _linear(max_total_tokens))

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=self.registry)

        self.batch_size = gauge("tgi_batch_current_size", "Sequences in the running batch")
        self.batch_max_tokens = gauge("tgi_batch_current_max_tokens",
                                      "KV token slots held by the running batch")
        self.batch_total = gauge("tgi_batch_max_total_tokens", "KV token slots in all")
        self.queue_size = gauge("tgi_queue_size", "Requests waiting for the batch")
        self.kv_usage = gauge("tokenmill_kv_cache_usage_ratio", "Fraction of KV blocks in use")
        self.kv_free = gauge("tokenmill_kv_cache_free_blocks", "Free KV blocks")
        self.prefix_hit = gauge("tokenmill_prefix_cache_hit_ratio",
                                "Prompt tokens served from the prefix cache / prompt tokens")
        self.in_flight = gauge("tokenmill_requests_in_flight", "HTTP requests being served")

    # ---- counters ------------------------------------------------------------------------
    def inc(self, name: str, by: float = 1.0) -> None:
        with self._c.lock:
            self._c.values[name] += by

    def failure(self, err: str) -> None:
        with self._c.lock:
            d = self._c.labelled["tgi_request_failure"]
            d[("err", err)] = d.get(("err", err), 0.0) + 1

    def counter(self, name: str, label: tuple[str, str] | None = None) -> float:
        with self._c.lock:
            if label is not None:
                return self._c.labelled[name].get(label, 0.0)
            return self._c.values[name]

    # ---- per request and per engine update -----------------------------------------------
    def request_done(self, *, validation: float, queue: float, inference: float, total: float,
                     input_tokens: int, generated: int, max_new_tokens: int) -> None:
        self.inc("tgi_request_success")
        self.validation.observe(validation)
        self.queue.observe(queue)
        self.inference.observe(inference)
        self.duration.observe(total)
        if generated > 1:
            self.per_token.observe(inference / (generated - 1))
        self.input_length.observe(input_tokens)
        self.generated.observe(generated)
        self.max_new.observe(max_new_tokens)

    def engine_stats(self, stats: Any, block_size: int) -> None:
        total, free = stats.num_kv_blocks, stats.num_free_kv_blocks
        self.batch_size.set(stats.num_running)
        self.queue_size.set(stats.num_waiting)
        self.batch_total.set(total * block_size)
        self.batch_max_tokens.set((total - free) * block_size)
        self.kv_free.set(free)
        self.kv_usage.set(1 - free / total if total else 0.0)
        self.prefix_hit.set(stats.prefix_hits / stats.prefix_queries
                            if stats.prefix_queries else 0.0)
        with self._c.lock:
            self._c.values["tokenmill_preemptions"] = float(stats.num_preemptions)

    def render(self) -> bytes:
        return self._c.render().encode() + generate_latest(self.registry)
