"""Closed-loop load: at each concurrency level, N workers each keep one request in flight."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.bench.client import ClientConfig, RequestRecord, send_request
from tokenmill.bench.metrics import LevelSummary, summarize
from tokenmill.bench.workload import Workload

# Called after each finished request with (level's concurrency, record).
OnDone = Callable[[int, RequestRecord], None]


@dataclass(slots=True)
class LevelResult:
    concurrency: int
    duration_s: float
    records: list[RequestRecord]
    summary: LevelSummary


@dataclass(slots=True)
class ServerRun:
    label: str
    cfg: ClientConfig
    levels: list[LevelResult] = field(default_factory=list)
    warmup: list[RequestRecord] = field(default_factory=list)
    server_info: dict[str, Any] | None = None


def _session(concurrency: int, timeout: float) -> Any:
    import aiohttp

    # A fresh connection per request (force_close): some servers (llama-server) close the
    # socket after a stream without saying so, and a reused pooled connection then fails.
    # Connecting over loopback costs well under a millisecond, the same for every server.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout))


async def run_level(cfg: ClientConfig, workload: Workload, concurrency: int, *,
                    requests: int | None = None, duration: float | None = None,
                    salt: str | None = None, warmup: bool = False,
                    on_done: OnDone | None = None) -> LevelResult:
    """`requests` requests in all (or as many as start within `duration` seconds), never more
    than `concurrency` in flight. Request i is `workload.spec(salt, i)`."""
    if (requests is None) == (duration is None):
        raise ValueError("give requests or duration")
    salt = salt or f"c{concurrency}"
    records: list[RequestRecord] = []
    next_i = 0
    t0 = time.perf_counter()
    deadline = t0 + duration if duration is not None else None

    async def worker(session: Any) -> None:
        nonlocal next_i
        while True:
            if requests is not None and next_i >= requests:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            i, next_i = next_i, next_i + 1
            spec = workload.spec(salt, i)
            rec = RequestRecord(index=i, concurrency=concurrency,
                                prompt_tokens=spec.prompt_tokens,
                                max_tokens=spec.output_tokens, warmup=warmup,
                                start=time.perf_counter() - t0)
            await send_request(session, cfg, spec, rec)
            records.append(rec)
            if on_done is not None:
                on_done(concurrency, rec)

    async with _session(concurrency, cfg.timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    return LevelResult(concurrency, elapsed, records, summarize(concurrency, records, elapsed))


async def fetch_json(url: str, api_key: str | None, timeout: float = 10.0) -> Any:
    """GET a JSON document; None on any failure (used for best-effort server facts)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.get(url, headers=headers) as r:
            if r.status != 200:
                return None
            return json.loads(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
        return None


async def served_model(cfg: ClientConfig) -> str | None:
    """The first model of GET /v1/models (vLLM wants the exact name; ours and TGI accept
    `tgi`), or None."""
    doc = await fetch_json(cfg.url.rstrip("/") + "/v1/models", cfg.api_key)
    try:
        return str(doc["data"][0]["id"])
    except (TypeError, KeyError, IndexError):
        return None


async def run_server(run: ServerRun, workload: Workload, levels: list[int], *,
                     requests: int | None, duration: float | None, warmup: int,
                     on_done: OnDone | None = None,
                     on_level: Callable[[int], None] | None = None) -> ServerRun:
    """Warm-up requests (one at a time), then every level in turn, filling in `run`."""
    base = run.cfg.url.rstrip("/")
    info = await fetch_json(base + "/info", run.cfg.api_key)
    run.server_info = info if isinstance(info, dict) else None
    if warmup:
        res = await run_level(run.cfg, workload, 1, requests=warmup, salt="warmup",
                              warmup=True)
        run.warmup = res.records
        if not any(r.ok for r in run.warmup):
            raise ConnectionError(f"{run.label}: every warm-up request failed: "
                                  f"{run.warmup[0].error}")
    for c in levels:
        if on_level is not None:
            on_level(c)
        run.levels.append(await run_level(run.cfg, workload, c, requests=requests,
                                          duration=duration, on_done=on_done))
    return run
