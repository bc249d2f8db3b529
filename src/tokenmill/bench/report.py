"""Bench results as rich tables, a JSON document and a PNG."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from tokenmill.bench.metrics import RATIO_FIELDS, ratios
from tokenmill.bench.runner import ServerRun


def _ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def _num(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def level_table(run: ServerRun) -> Table:
    """One row per concurrency level: latency percentiles (ms), throughput, errors."""
    t = Table(title=f"{run.label}: {run.cfg.api} at {run.cfg.url}", title_justify="left")
    for name in ("conc", "reqs", "TTFT\np50", "TTFT\np90", "TTFT\np99", "ITL\np50",
                 "ITL\np99", "E2E\np50", "E2E\np99", "out\ntok/s", "req/s", "errors"):
        t.add_column(name, justify="right")
    for lv in run.levels:
        s = lv.summary
        t.add_row(str(s.concurrency), str(s.requests), _ms(s.ttft_p50), _ms(s.ttft_p90),
                  _ms(s.ttft_p99), _ms(s.itl_p50), _ms(s.itl_p99), _ms(s.e2e_p50),
                  _ms(s.e2e_p99), _num(s.output_tok_s), _num(s.req_s, 2),
                  f"[red]{s.errors}[/red]" if s.errors else "0")
    t.caption = "latencies in ms; TTFT = time to first token, ITL = inter-token latency"
    return t


def compare_rows(a: ServerRun, b: ServerRun) -> list[tuple[int, dict[str, float]]]:
    """(concurrency, A/B ratios) for each level both runs have."""
    bs = {lv.concurrency: lv.summary for lv in b.levels}
    return [(lv.concurrency, ratios(lv.summary, bs[lv.concurrency]))
            for lv in a.levels if lv.concurrency in bs]


RATIO_TITLES = {"output_tok_s": "out tok/s", "req_s": "req/s", "ttft_p50": "TTFT p50",
                "ttft_p99": "TTFT p99", "itl_p50": "ITL p50", "e2e_p50": "E2E p50"}


def compare_table(a: ServerRun, b: ServerRun) -> Table:
    t = Table(title=f"{a.label} / {b.label}", title_justify="left")
    t.add_column("conc", justify="right")
    for name, _ in RATIO_FIELDS:
        t.add_column(RATIO_TITLES[name], justify="right")
    for c, r in compare_rows(a, b):
        cells = []
        for name, higher_better in RATIO_FIELDS:
            x = r[name]
            good = not math.isnan(x) and (x > 1) == higher_better and x != 1
            cells.append(f"[green]{x:.2f}x[/green]" if good else _num(x, 2) + "x")
        t.add_row(str(c), *cells)
    t.caption = (f"ratios {a.label}/{b.label}: green favours {a.label} (higher throughput, "
                 "lower latency)")
    return t


def _run_dict(run: ServerRun, *, records: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"label": run.label, "url": run.cfg.url, "api": run.cfg.api,
                         "model": run.cfg.model, "server_info": run.server_info,
                         "levels": []}
    for lv in run.levels:
        entry: dict[str, Any] = {"concurrency": lv.concurrency, "summary": lv.summary.to_dict()}
        if records:
            entry["records"] = [asdict(r) for r in lv.records]
        d["levels"].append(entry)
    if records:
        d["warmup"] = [asdict(r) for r in run.warmup]
    return d


def results_dict(config: dict[str, Any], runs: list[ServerRun]) -> dict[str, Any]:
    """Everything: the configuration, per-level summaries, raw per-request records and, for
    two runs, the A/B ratios."""
    out: dict[str, Any] = {"config": config, "runs": [_run_dict(r) for r in runs]}
    if len(runs) == 2:
        out["comparison"] = [
            {"concurrency": c, **{k: None if math.isnan(v) else v for k, v in r.items()}}
            for c, r in compare_rows(*runs)]
    return out


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")


def matplotlib_missing() -> str | None:
    """An error message when matplotlib cannot be imported (it is an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return (f"--plot needs matplotlib, which cannot be imported ({e}): "
                "pip install 'tokenmill[bench]'")
    return None


def write_plot(path: str | Path, runs: list[ServerRun]) -> None:
    """Throughput against concurrency, and TTFT / ITL / end-to-end distributions per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax = axes[0][0]
    for run in runs:
        xs = [lv.concurrency for lv in run.levels]
        ax.plot(xs, [lv.summary.output_tok_s for lv in run.levels], "o-", label=run.label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({lv.concurrency for r in runs for lv in r.levels}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set(xlabel="concurrency", ylabel="output tokens/s", title="throughput")
    ax.legend()
    for ax, (key, title) in zip((axes[0][1], axes[1][0], axes[1][1]),
                                (("ttft", "time to first token"), ("itl", "inter-token latency"),
                                 ("e2e", "end-to-end latency"))):
        data, labels = [], []
        for run in runs:
            for lv in run.levels:
                ok = [r for r in lv.records if r.ok]
                vals = ([g for r in ok for g in r.itl] if key == "itl"
                        else [getattr(r, key) for r in ok if getattr(r, key) is not None])
                data.append([v * 1000 for v in vals] or [math.nan])
                labels.append(f"{run.label}\nc={lv.concurrency}" if len(runs) > 1
                              else f"c={lv.concurrency}")
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set(ylabel="ms", title=title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
