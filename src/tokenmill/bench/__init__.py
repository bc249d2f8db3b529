"""`tokenmill bench`: a load generator for servers speaking the OpenAI or TGI streaming APIs.

workload.py (prompts and lengths) → runner.py (concurrency levels) → client.py (one streamed
request, timed; sse.py parses the stream) → metrics.py (percentiles, per-level summaries) →
report.py (rich tables, JSON, PNG). cli.py holds the `tokenmill bench` flags. Nothing here
imports torch unless `--tokenizer` is given.
"""
