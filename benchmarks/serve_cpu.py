"""Where the CPU of a served token goes: tokenmill's API process, its engine process and the
load generator, in CPU milliseconds per output token, at each concurrency level.

On a small machine every process shares the engine's cores, so the API process's CPU per
token is time taken from the engine's matmuls (a preempted OpenMP thread stalls the step at
its next barrier): at concurrency 1 it shows as inter-token latency above the engine's own
step time. The script starts `tokenmill serve` (the peer script's flags), drives it with
`tokenmill bench` (OpenAI completions, streamed, ignore_eos) one level at a time, and reads
each process's user + system time from /proc around each level (Linux only).

    .venv/bin/python benchmarks/serve_cpu.py [--concurrency 1,32] [--requests 16]
        [--kv-cache-dtype int8] [--prompt-tokens 128] [--output-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from peer_llama_cpp import free_port, start

from tokenmill.bench.machine import CpuWatch


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least "
                    "the level)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-dtype", default="int8")
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    args = ap.parse_args()
    if not Path("/proc/self/stat").exists():
        sys.exit("needs Linux's /proc")
    levels = [int(c) for c in args.concurrency.split(",")]
    port, logs = free_port(), Path(tempfile.mkdtemp(prefix="serve-cpu-"))
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--hostname", "127.0.0.1",
           "--port", str(port), "--kv-cache-dtype", args.kv_cache_dtype,
           "--max-concurrent-requests", str(max(128, 2 * max(levels))),
           "--max-batch-size", str(max(256, max(levels)))]
    if args.model:
        cmd += ["--model-id", args.model]
    server = start("tokenmill", cmd, port, logs).wait_ready()
    print(f"load average {os.getloadavg()[0]:.2f}; logs in {logs}")
    watch = CpuWatch()
    rows = []
    try:
        with urllib.request.urlopen(f"{server.url}/info", timeout=10) as r:
            engine_pid = json.load(r).get("engine_pid") or server.proc.pid
        for c in levels:
            out = logs / f"bench-{c}.json"
            bench = [sys.executable, "-m", "tokenmill", "bench", "--url", server.url,
                     "--concurrency", str(c), "--requests", str(max(c, args.requests)),
                     "--prompt-tokens", str(args.prompt_tokens),
                     "--output-tokens", str(args.output_tokens), "--warmup", str(min(c, 4)),
                     "--no-progress", "--json", str(out)]
            before = cpu_seconds(server.proc.pid), cpu_seconds(engine_pid)
            client = subprocess.run(bench, capture_output=True, text=True)
            after = cpu_seconds(server.proc.pid), cpu_seconds(engine_pid)
            if client.returncode != 0:
                raise RuntimeError(f"tokenmill bench failed:\n{client.stderr[-2000:]}")
            summary = json.loads(out.read_text())["runs"][0]["levels"][0]["summary"]
            # The warm-up requests ran inside the window too: count their tokens.
            tokens = summary["output_tokens"] + min(c, 4) * args.output_tokens
            api, engine = (after[i] - before[i] for i in range(2))
            rows.append((c, summary, 1e3 * api / tokens, 1e3 * engine / tokens))
    finally:
        server.stop()
    sharing = watch.result()
    print("| concurrency | output tok/s | ITL p50 (ms) | API process CPU ms / token | "
          "engine CPU ms / token |")
    print("|---:|---:|---:|---:|---:|")
    for c, s, api, engine in rows:
        print(f"| {c} | {s['output_tok_s']:.1f} | {1e3 * s['itl_p50']:.2f} | {api:.3f} | "
              f"{engine:.2f} |")
    if sharing is not None:
        print(f"{sharing.describe()}{' (busy)' if sharing.busy() else ''}")
    print("The engine's CPU counts its OpenMP threads' spinning, so it is not its work alone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
