"""`tokenmill bench`: flags and the run. Importing this module is cheap (argparse only)."""

from __future__ import annotations

import argparse
import os
from typing import Any

_DESCRIPTION = """\
Load-test a server that speaks the OpenAI or TGI streaming API (tokenmill, TGI, vLLM,
llama.cpp's llama-server): a sweep of concurrency levels, each a closed loop of N workers,
with TTFT / inter-token / end-to-end percentiles and throughput per level. Lengths are a
count (128), uniform:LO:HI or normal:MEAN:STD tokens."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none or the text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "(default" in text:  # flags too
            return text
        return super()._get_help_string(action) or text


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the `tokenmill` command's subparsers."""
    p = subparsers.add_parser(
        "bench", help="load-test an OpenAI- or TGI-compatible server", description=_DESCRIPTION,
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("servers")
    g.add_argument("--url", default="http://127.0.0.1:3000", help="base URL of the server")
    g.add_argument("--label", default="A", help="name of --url in tables")
    g.add_argument("--compare-url", default=None,
                   help="a second server, run with the same workload after the first")
    g.add_argument("--compare-label", default="B", help="name of --compare-url in tables")
    g.add_argument("--api", choices=["openai-completions", "openai-chat", "tgi"],
                   default="openai-completions")
    g.add_argument("--api-key", default=None,
                   help="sent as a Bearer token (default: env API_KEY)")
    g.add_argument("--compare-api-key", default=None,
                   help="key of --compare-url (default: --api-key)")
    g.add_argument("--model", default=None,
                   help="OpenAI `model` (default: the first of GET /v1/models, else 'tgi')")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds without data before a request fails")
    w = p.add_argument_group("workload")
    w.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated concurrency levels, run in turn")
    n = w.add_mutually_exclusive_group()
    n.add_argument("--requests", type=int, default=None,
                   help="requests per level (default 32 unless --duration)")
    n.add_argument("--duration", type=float, default=None,
                   help="seconds per level: requests start until then, and finish")
    w.add_argument("--prompt-tokens", default="128", help="prompt length")
    w.add_argument("--output-tokens", default="128", help="output length")
    w.add_argument("--prompt-file", default=None,
                   help="prompts, one per line, or JSONL with `prompt` (and `output_tokens`)")
    w.add_argument("--tokenizer", default=None,
                   help="model folder, .gguf, Hub id or 'default' whose tokenizer makes exact "
                        "prompt lengths (loads torch); without it, 1 word ≈ 1 token")
    w.add_argument("--warmup", type=int, default=2,
                   help="requests sent one at a time before the first level (not counted)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not ask the server to keep going past EOS")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH",
                   help="write config, per-level summaries and per-request records")
    o.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG (needs matplotlib: the `bench` extra)")
    o.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_bench)
    return p


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: expected integers like 1,4,16, got {text!r}") \
            from None
    if not levels or min(levels) < 1:
        raise ValueError("--concurrency: levels are integers >= 1")
    return levels


def run_bench(a: argparse.Namespace) -> int:
    """Run the bench described by the parsed flags; 0, or 1 when any request failed, 2 on a
    usage error."""
    import asyncio

    from rich.console import Console

    from tokenmill.bench import report
    from tokenmill.bench.workload import LengthDist, Workload, load_prompt_file

    err = Console(stderr=True)
    try:
        levels = _levels(a.concurrency)
        plen, olen = LengthDist.parse(a.prompt_tokens), LengthDist.parse(a.output_tokens)
        if a.requests is not None and a.requests < 1:
            raise ValueError("--requests must be >= 1")
        if a.duration is not None and a.duration <= 0:
            raise ValueError("--duration must be > 0")
        prompts = load_prompt_file(a.prompt_file) if a.prompt_file else None
        if a.plot and (msg := report.matplotlib_missing()):
            raise ValueError(msg)
    except (ValueError, OSError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    requests = a.requests if a.requests is not None or a.duration is not None else 32
    tokenizer = None
    if a.tokenizer:
        from tokenmill.bench.workload import load_tokenizer

        try:
            tokenizer = load_tokenizer(a.tokenizer)
        except Exception as e:  # any load failure: say which and stop
            err.print(f"[red]error:[/red] --tokenizer {a.tokenizer}: {e}")
            return 2
    elif not prompts:
        err.print("[yellow]note:[/yellow] no --tokenizer: prompt lengths are estimated at "
                  "1 token per word (exact for the default model's tokenizer)")
    workload = Workload(plen, olen, seed=a.seed, tokenizer=tokenizer, prompt_file=prompts)
    try:
        runs = asyncio.run(_bench(a, workload, levels, requests, err))
    except ConnectionError as e:
        err.print(f"[red]error:[/red] {e}")
        return 1
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)  # a pipe or file: whole tables, not cut to 80 columns
    for run in runs:
        out.print(report.level_table(run))
    if len(runs) == 2:
        out.print(report.compare_table(*runs))
    if a.json:
        report.write_json(a.json, report.results_dict(_config(a, workload, levels, requests),
                                                      runs))
        out.print(f"results written to {a.json}")
    if a.plot:
        report.write_plot(a.plot, runs)
        out.print(f"plot written to {a.plot}")
    return 1 if any(lv.summary.errors for r in runs for lv in r.levels) else 0


def _config(a: argparse.Namespace, workload: Any, levels: list[int],
            requests: int | None) -> dict[str, Any]:
    import platform
    import time

    return {
        "tool": "tokenmill bench", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client_host": platform.node(), "loadavg": list(os.getloadavg()),
        "api": a.api, "concurrency": levels, "requests_per_level": requests,
        "duration_per_level": a.duration, "prompt_tokens": str(workload.prompt_tokens),
        "output_tokens": str(workload.output_tokens), "prompt_file": a.prompt_file,
        "tokenizer": a.tokenizer, "exact_prompt_tokens": workload.exact_prompt_tokens,
        "warmup": a.warmup, "seed": a.seed, "temperature": a.temperature,
        "ignore_eos": a.ignore_eos, "url": a.url, "compare_url": a.compare_url,
    }


async def _bench(a: argparse.Namespace, workload: Any, levels: list[int],
                 requests: int | None, err: Any) -> list[Any]:
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokenmill.bench.client import ClientConfig
    from tokenmill.bench.runner import ServerRun, run_server, served_model

    key = a.api_key or os.environ.get("API_KEY") or None
    targets = [(a.label, a.url, key)]
    if a.compare_url:
        targets.append((a.compare_label, a.compare_url, a.compare_api_key or key))
    runs: list[ServerRun] = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=not a.progress)
    with progress:
        for label, url, key in targets:
            cfg = ClientConfig(url=url, api=a.api, model=a.model, api_key=key,
                               ignore_eos=a.ignore_eos, temperature=a.temperature,
                               timeout=a.timeout)
            if a.api != "tgi" and cfg.model is None:
                cfg = replace(cfg, model=await served_model(cfg) or "tgi")
            run = ServerRun(label, cfg)
            task = progress.add_task(f"{label} warm-up", total=None)

            def on_level(c: int, task: Any = task, label: str = label) -> None:
                progress.reset(task, description=f"{label} c={c}", total=requests)

            def on_done(c: int, rec: Any, task: Any = task) -> None:
                progress.advance(task)

            await run_server(run, workload, levels, requests=requests, duration=a.duration,
                             warmup=a.warmup, on_done=on_done, on_level=on_level)
            progress.update(task, description=f"{label} done")
            runs.append(run)
    return runs
