"""Logging set-up: plain lines, or one JSON object per line with --json-output."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

_EXTRA = "fields"  # request log lines carry their fields under this attribute


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        body.update(getattr(record, _EXTRA, None) or {})
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


def setup_logging(json_output: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if json_output:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_request(logger: logging.Logger, **fields: Any) -> None:
    """One INFO line per finished request (id, tokens in/out, timings, finish reason)."""
    text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in fields.items())
    logger.info("request %s", text, extra={_EXTRA: fields})
