"""tokenmill against llama.cpp's C++ `llama-server` on the same GGUF file, and tokenmill's
offline `LLM` against transformers' `generate`, in one run. Prints (and with --out writes) a
markdown table of the ratios.

llama-server is built once (at nice 19) into the cache directory from the llama.cpp tree
vendored in the llama-cpp-python source package on PyPI; later runs reuse the binary.

Workloads (flags change them): 128-token prompts and 128 output tokens (ignore_eos) at
concurrency 1 and 32, then one 1,024-token prompt at a time for TTFT, each against both
servers back to back; then 64 prompts x 128 new tokens offline (benchmarks/offline_throughput.py),
tokenmill and transformers alternating in 3 pairs (fresh prompts each), the median ratio kept.
Only ratios from one run are comparable: the machines are shared, so the load average before
and the CPU that other processes (and the hypervisor's steal) took during the run are
printed (tokenmill.bench.machine), and a busy machine is called out.

    .venv/bin/python benchmarks/peer_llama_cpp.py [--out results.md] [--json raw.json] [--build-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.bench.client import ClientConfig
from tokenmill.bench.machine import CpuWatch
from tokenmill.bench.metrics import LevelSummary
from tokenmill.bench.runner import ServerRun, run_server
from tokenmill.bench.workload import LengthDist, Workload, load_tokenizer
from tokenmill.config import QUANTIZE_CHOICES

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no npm, no web-UI download
    "-DLLAMA_OPENSSL=OFF",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- build


def run_low_priority(cmd: list[str], log_path: Path) -> None:
    """Run `cmd` at nice 19 in a session of its own, its output appended to `log_path`. With
    autogroup scheduling on (the Linux default), nice only ranks processes within one session,
    so the new session's group is niced too (/proc/PID/autogroup) to yield the CPU to
    everything else on the machine."""
    with log_path.open("ab") as f:
        p = subprocess.Popen(["nice", "-n", "19", *cmd], start_new_session=True, stdout=f,
                             stderr=subprocess.STDOUT)
    with contextlib.suppress(OSError):  # no autogroup: plain nice is enough
        Path(f"/proc/{p.pid}/autogroup").write_text("19")
    try:
        rc = p.wait()
    except BaseException:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait()
        raise
    if rc:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); end of {log_path}:\n{tail}")


def build_llama_server(cache: Path, jobs: int) -> tuple[Path, str]:
    """The cached llama-server binary and its version, building it first if needed. An
    interrupted build resumes: the source and build trees stay in `cache` until it succeeds."""
    binary, version_file = cache / "bin" / "llama-server", cache / "bin" / "VERSION"
    if binary.is_file() and version_file.is_file():
        return binary, version_file.read_text().strip()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src_root = cache / "src"
    srcs = sorted(src_root.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not srcs:
        log("downloading the llama-cpp-python source package (pip download) ...")
        with tempfile.TemporaryDirectory(prefix="sdist-", dir=cache) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--no-binary", ":all:", "--disable-pip-version-check", "-q",
                            "-d", tmp, "llama-cpp-python"], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            shutil.rmtree(src_root, ignore_errors=True)
            with tarfile.open(sdist) as tf:
                tf.extractall(src_root, filter="data")
        srcs = sorted(src_root.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    src = srcs[-1].parent
    version = "llama-cpp-python " + src.parent.parent.name.removeprefix("llama_cpp_python-")
    build, build_log = cache / "build", cache / "build.log"
    log(f"building llama-server from {version} (nice 19, -j{jobs}; log in {build_log}) ...")
    run_low_priority(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], build_log)
    run_low_priority(["cmake", "--build", str(build), "--target", "llama-server",
                      "-j", str(jobs)], build_log)
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", binary)
    version_file.write_text(version + "\n")
    shutil.rmtree(build, ignore_errors=True)
    shutil.rmtree(src_root, ignore_errors=True)
    build_log.unlink(missing_ok=True)
    log(f"built {binary} in {time.perf_counter() - t0:.0f} s")
    return binary, version


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def wait_ready(self, timeout: float = 300.0) -> Server:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, cmd: list[str], port: int, logs: Path) -> Server:
    path = logs / f"{name}.log"
    with path.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    return Server(name, proc, f"http://127.0.0.1:{port}", path)


# ---------------------------------------------------------------------------- runs


@dataclass
class Phase:
    """One workload run against both servers (same requests)."""

    title: str
    workload: Workload
    levels: list[int]
    requests: dict[int, int]  # per level


async def run_phase(phase: Phase, servers: dict[str, Server], warmup: int,
                    ) -> dict[str, ServerRun]:
    out: dict[str, ServerRun] = {}
    for name, srv in servers.items():  # back to back, never at the same time
        run = ServerRun(name, ClientConfig(url=srv.url, api="openai-completions",
                                           model=None if name == "tokenmill" else "peer"))
        for c in phase.levels:
            part = ServerRun(name, run.cfg)
            await run_server(part, phase.workload, [c], requests=phase.requests[c],
                             duration=None, warmup=warmup if c == phase.levels[0] else 0)
            run.levels += part.levels
            run.warmup += part.warmup
            run.server_info = run.server_info or part.server_info
        for lv in run.levels:
            s = lv.summary
            log(f"  {phase.title}: {name:9s} c={s.concurrency:<3d} {s.output_tok_s:7.1f} "
                f"tok/s  TTFT p50 {s.ttft_p50 * 1e3:7.1f} ms  ITL p50 {s.itl_p50 * 1e3:6.1f} ms"
                f"  errors {s.errors}")
            if s.errors:
                err = next(r.error for r in lv.records if not r.ok)
                raise RuntimeError(f"{name}: {s.errors} requests failed, e.g. {err}")
        out[name] = run
    return out


def check_lengths(runs: dict[str, ServerRun]) -> list[str]:
    """Both servers must have produced the same number of tokens (ignore_eos honoured)."""
    notes = []
    counts = {n: [lv.summary.output_tokens for lv in r.levels] for n, r in runs.items()}
    if len({tuple(v) for v in counts.values()}) > 1:
        notes.append(f"output token counts differ between servers: {counts}")
    return notes


def offline(args: argparse.Namespace) -> dict[str, Any]:
    """tokenmill LLM vs transformers generate: batch-1 decode and N x M throughput (tok/s).
    The throughput runs alternate, tokenmill then transformers on the same prompts, in
    `--offline-repeats` pairs with fresh prompts each (the prefix cache must not help); the
    ratio reported is the median of the pairs' ratios, so one noisy window does not decide."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import offline_throughput as ot
    import torch
    import transformers

    from tokenmill.llm import LLM
    from tokenmill.loader import default_model_path

    llm = LLM(dtype="auto", max_batch_total_tokens=65536, quantize=args.quantize,
              kv_cache_dtype=args.kv_cache_dtype)
    dtype = getattr(torch, llm.engine.info.dtype)
    pad = llm.engine.info.eos_token_ids[0]
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).to(dtype).eval()
    warm = ot.make_prompts(llm.tokenizer, 4, args.prompt_tokens, seed=1000)
    ot.bench_tokenmill(llm, warm, 8)
    ot.bench_transformers(model, warm, 8, pad)
    r: dict[str, Any] = {
        "tm_decode": ot.bench_tokenmill_decode(llm, warm[0], args.output_tokens),
        "hf_decode": ot.bench_transformers_decode(model, warm[0], args.output_tokens, pad),
        "pairs": []}
    for i in range(args.offline_repeats):
        prompts = ot.make_prompts(llm.tokenizer, args.offline_prompts, args.prompt_tokens, seed=i)
        tm = ot.bench_tokenmill(llm, prompts, args.output_tokens)
        hf = ot.bench_transformers(model, prompts, args.output_tokens, pad)
        log(f"offline pair {i + 1}/{args.offline_repeats}: tokenmill {tm:.1f} tok/s, "
            f"transformers {hf:.1f} tok/s ({tm / hf:.2f}x)")
        r["pairs"].append((tm, hf))
    r["ratio"] = statistics.median(tm / hf for tm, hf in r["pairs"])
    r["tm_batch"] = statistics.median(tm for tm, _ in r["pairs"])
    r["hf_batch"] = statistics.median(hf for _, hf in r["pairs"])
    return r


# ---------------------------------------------------------------------------- report


def _row(workload: str, metric: str, tm: float, peer: float, ms: bool = False) -> str:
    k = 1e3 if ms else 1.0
    fmt = ".1f"
    return (f"| {workload} | {metric} | {tm * k:{fmt}} | {peer * k:{fmt}} | "
            f"{tm / peer:.2f}x |" if peer else f"| {workload} | {metric} | {tm * k:{fmt}} | - | - |")


def markdown(head: list[str], serve: list[tuple[str, dict[str, ServerRun]]],
             off: dict[str, Any] | None, args: argparse.Namespace) -> str:
    lines = [*head, "",
             "| workload | metric | tokenmill | peer | tokenmill / peer |",
             "|---|---|---:|---:|---:|"]
    for title, runs in serve:
        tm, lc = runs["tokenmill"], runs["llama.cpp"]
        for a, b in zip(tm.levels, lc.levels):
            sa, sb = a.summary, b.summary
            w = f"vs llama-server: {title}, c={sa.concurrency}"
            if title.startswith("TTFT"):
                lines.append(_row(w, "TTFT p50 (ms)", sa.ttft_p50, sb.ttft_p50, ms=True))
                continue
            lines += [_row(w, "output tok/s", sa.output_tok_s, sb.output_tok_s),
                      _row(w, "TTFT p50 (ms)", sa.ttft_p50, sb.ttft_p50, ms=True),
                      _row(w, "ITL p50 (ms)", sa.itl_p50, sb.itl_p50, ms=True),
                      _row(w, "E2E p50 (ms)", sa.e2e_p50, sb.e2e_p50, ms=True)]
    if off is not None:
        w = f"vs transformers generate (offline), {args.offline_prompts} x {args.output_tokens}"
        pairs = "; ".join(f"{tm:.1f} vs {hf:.1f} ({tm / hf:.2f}x)" for tm, hf in off["pairs"])
        lines += [f"| {w} | batched output tok/s, median of {len(off['pairs'])} pairs | "
                  f"{off['tm_batch']:.1f} | {off['hf_batch']:.1f} | {off['ratio']:.2f}x |",
                  _row("vs transformers generate (offline), batch 1", "decode tok/s",
                       off["tm_decode"], off["hf_decode"])]
        lines += ["", f"Offline pairs (tokenmill vs transformers, tok/s, alternating): {pairs}."]
    lines += ["", "Throughput ratios > 1 and latency ratios < 1 favour tokenmill."]
    return "\n".join(lines) + "\n"


def load_line(label: str) -> tuple[str, bool]:
    load1 = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    busy = load1 > 0.5 * cores
    return (f"load average {label}: {load1:.2f} on {cores} cores"
            + (" (machine busy: ratios are less reliable)" if busy else "")), busy


def _summary(s: LevelSummary) -> str:
    return f"{s.output_tokens} tokens in {s.duration_s:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path,
                    default=Path("~/.cache/tokenmill/llama.cpp").expanduser())
    ap.add_argument("--jobs", type=int, default=2, help="build parallelism")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: tokenmill's)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default: 2 x concurrency, at least 4)")
    ap.add_argument("--long-prompt-tokens", type=int, default=1024)
    ap.add_argument("--long-requests", type=int, default=4)
    ap.add_argument("--offline-prompts", type=int, default=64)
    ap.add_argument("--offline-repeats", type=int, default=3,
                    help="alternating tokenmill/transformers throughput pairs (median ratio)")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                    help="tokenmill's --quantize, for the server and the offline run "
                         "(default: as the GGUF is, w4a8 for Q4_0/Q4_1 weights)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                    help="tokenmill's --kv-cache-dtype; int8 gives llama-server its q8_0 "
                         "cache (-ctk q8_0 -ctv q8_0 -fa on), the same format (the fp8 "
                         "caches are for CUDA: on CPU they take the slow torch path)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="llama-server threads (tokenmill: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    ap.add_argument("--json", type=Path, default=None,
                    help="write every serving run's summaries and per-request records here")
    args = ap.parse_args()

    binary, version = build_llama_server(args.cache_dir, args.jobs)
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stderr
    version += "".join(f", llama.cpp {line.removeprefix('version: ')}"
                       for line in out.splitlines() if line.startswith("version:"))
    if args.build_only:
        print(binary)
        return 0
    from tokenmill.loader import default_model_path

    gguf = args.model or default_model_path()
    levels = [int(c) for c in args.concurrency.split(",")]
    n_par = max(levels)
    per_slot = max(args.prompt_tokens + args.output_tokens, args.long_prompt_tokens + 16) + 64
    start_line, busy = load_line("before")
    log(start_line)
    watch = CpuWatch()
    tok = load_tokenizer(str(gguf))

    def wl(p: int, o: int, seed: int) -> Workload:
        return Workload(LengthDist.parse(str(p)), LengthDist.parse(str(o)), seed=seed,
                        tokenizer=tok)

    phases = [
        Phase(f"{args.prompt_tokens}-token prompts, {args.output_tokens} output tokens",
              wl(args.prompt_tokens, args.output_tokens, 0), levels,
              {c: args.requests or max(4, 2 * c) for c in levels}),
        Phase(f"TTFT, {args.long_prompt_tokens}-token prompts",
              wl(args.long_prompt_tokens, 16, 1), [1], {1: args.long_requests}),
    ]
    logs = Path(tempfile.mkdtemp(prefix="peer-llama-cpp-"))
    lp, tp = free_port(), free_port()
    llama_cmd = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(lp),
        "-np", str(n_par), "-c", str(n_par * per_slot), "-t", str(args.threads), "--no-webui",
        *(["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"] if args.kv_cache_dtype == "int8"
          else [])]
    servers = {
        "tokenmill": start("tokenmill", [
            sys.executable, "-m", "tokenmill", "serve", "--model-id", str(gguf),
            "--hostname", "127.0.0.1", "--port", str(tp),
            "--max-batch-total-tokens", str(n_par * per_slot),
            "--max-concurrent-requests", str(max(128, 2 * n_par)),
            "--max-batch-size", str(max(256, n_par)),
            *(["--quantize", args.quantize] if args.quantize else []),
            "--kv-cache-dtype", args.kv_cache_dtype], tp, logs),
        "llama.cpp": start("llama.cpp", llama_cmd, lp, logs),
    }
    serve: list[tuple[str, dict[str, ServerRun]]] = []
    notes: list[str] = []
    try:
        try:
            servers["llama.cpp"].wait_ready()
        except RuntimeError:
            # llama.cpp's AMX matmul (weights repacked into its AMX buffer on CPUs with
            # amx_int8) segfaults on this model at its warm-up run (ggml-org/llama.cpp#20824,
            # closed without a fix): serve again with the weights as they are in the file, the
            # AVX-512 VNNI path it takes on every other x86 machine.
            if servers["llama.cpp"].proc.returncode != -signal.SIGSEGV:
                raise
            servers["llama.cpp"] = start("llama.cpp", [*llama_cmd, "--no-repack"], lp, logs)
            servers["llama.cpp"].wait_ready()
            notes.append("llama-server crashed (SIGSEGV) in its AMX matmul at start-up "
                         "(ggml-org/llama.cpp#20824) and serves with --no-repack")
        servers["tokenmill"].wait_ready()
        for ph in phases:
            runs = asyncio.run(run_phase(ph, servers, warmup=2))
            notes += check_lengths(runs)
            serve.append((ph.title, runs))
    finally:
        for s in servers.values():
            s.stop()
    off = None if args.skip_offline else offline(args)
    sharing = watch.result()
    end_line = sharing.describe() if sharing else "no /proc/stat: sharing not measured"
    busy_during = bool(sharing and sharing.busy())
    log(end_line)
    info = serve[0][1]["tokenmill"].server_info or {}
    head = [
        f"## tokenmill vs llama.cpp llama-server and transformers ({time.strftime('%Y-%m-%d')})",
        "",
        f"- machine: {os.cpu_count()} CPUs, {os.uname().machine}; {start_line}; {end_line}",
        f"- model: {gguf.name}; tokenmill dtype {info.get('model_dtype', '?')} "
        + (f"with --quantize {args.quantize}, " if args.quantize else
           "with the GGUF's default (4-bit Q4_0/Q4_1 weights: w4a8), ")
        + f"llama-server on the quantized GGUF ({version}, -t {args.threads}, -np {n_par})"
        + ("; int8 KV caches (tokenmill --kv-cache-dtype int8, llama-server -ctk/-ctv q8_0)"
           if args.kv_cache_dtype == "int8" else ""),
        "- serving: OpenAI /v1/completions, streamed, ignore_eos, exact-length prompts "
        "(tokenizer of the GGUF), closed loop; each server alone on the machine in turn",
        *[f"- serving {title}: " + "; ".join(
            f"{n} c={lv.concurrency}: {_summary(lv.summary)}" for n, r in runs.items()
            for lv in r.levels) for title, runs in serve],
        *(f"- note: {n}" for n in notes),
    ]
    if busy or busy_during:
        head.append("- **the machine was busy during the run: ratios are less reliable**")
    md = markdown(head, serve, off, args)
    print(md)
    if args.out:
        args.out.write_text(md)
    if args.json:
        from tokenmill.bench.report import results_dict, write_json

        write_json(args.json, {"phases": [
            {"title": title, **results_dict({"gguf": str(gguf), "version": version},
                                            list(runs.values()))}
            for title, runs in serve], "offline": off})
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
