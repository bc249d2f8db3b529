"""LoRA adapters at run time: vLLM's `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`
(behind `--api-key` like every route but /health and /metrics), and loading on first use.

Only folders under `--lora-dynamic-dir` roots may be loaded: a relative `lora_path` is taken
inside the first root, and anything that resolves outside every root (`../`, an absolute path
elsewhere, a symlink out) is refused. With a root configured, a request whose `adapter_id` (or
OpenAI `model`) is not loaded but names a sub-folder of a root loads it first; concurrent
requests for the same adapter share one load, and the batch runs on meanwhile (the engine reads
the files on a worker thread). Such names must be canonical relative paths (no `.`, `..` or
empty parts), so one folder answers to one name and cannot be loaded again under another.

Error messages name folders relative to the root: clients never see the server's paths.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.frontend.async_llm import EngineDeadError
from tokenmill.lora.adapter import AdapterError, resolve_adapter_path
from tokenmill.server.errors import GenerationError, NotFoundError, RequestError
from tokenmill.server.state import ServerState, parse_body

_PLACEHOLDERS = ("", "tgi", "dummy")  # names clients send for the base model
_NAME_MAX = 255  # bytes of one path part (Linux's NAME_MAX)
_ROOT = "<lora-dynamic-dir>"


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256, description="Name requests will use.")
    lora_path: str = Field(min_length=1, max_length=4096,
                           description="Adapter folder, relative to (or inside) a "
                                       "--lora-dynamic-dir root.")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(default=None, description="Accepted for vLLM clients; unused.")


def _bad(message: str) -> RequestError:
    return RequestError(400, "validation", message)


def _short(name: str) -> str:
    return name if len(name) <= 80 else name[:77] + "..."


def public(message: str, roots: list[str]) -> str:
    """`message` with every root's path (as configured and resolved) replaced by a
    placeholder."""
    for root in roots:
        for form in sorted({root.rstrip("/"), os.path.realpath(root)}, key=len, reverse=True):
            if form:
                message = message.replace(form, _ROOT)
    return message


def dynamic_name_error(name: str) -> str | None:
    """Why `name` cannot name an adapter folder under a root (None: it can)."""
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)):
        return ("not an adapter folder name: a path relative to --lora-dynamic-dir without "
                "'.', '..' or empty parts")
    if any(len(p.encode()) > _NAME_MAX for p in parts):
        return f"a folder name is longer than {_NAME_MAX} bytes"
    return None


def resolve_in_roots(roots: list[str], requested: str) -> Path:
    """The real adapter folder for `requested`, which must lie under one of `roots`."""
    if not roots:
        raise _bad("run-time LoRA loading is disabled: start the server with --lora-dynamic-dir")
    error: AdapterError | None = None
    for root in roots:
        try:
            return resolve_adapter_path(Path(root), requested)
        except AdapterError as e:
            error = error or e
        except OSError as e:  # a name the file system refuses (too long, ...)
            error = error or AdapterError(f"adapter path {_short(requested)!r}: {e.strerror}")
    assert error is not None
    raise _bad(public(str(error), roots))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


async def _load(state: ServerState, name: str, path: Path) -> None:
    """One load per adapter name at a time; concurrent callers await the same task, which a
    client that goes away does not cancel."""
    pending: dict[str, asyncio.Task[None]] = state.adapter_loads
    task = pending.get(name)
    if task is None:
        task = asyncio.create_task(state.engine.load_adapter(name, str(path)))
        pending[name] = task

        def done(t: asyncio.Task[None]) -> None:
            pending.pop(name, None)
            if not t.cancelled():
                t.exception()  # retrieved: no warning when every waiter has gone

        task.add_done_callback(done)
    await asyncio.shield(task)


async def ensure_adapter(state: ServerState, name: str | None) -> None:
    """Load `name` on first use when it is a sub-folder of a dynamic root; otherwise leave
    the verdict (unknown adapter → 4xx) to validation."""
    roots = state.config.lora_dynamic_dirs
    engine = state.engine
    if (not roots or engine is None or name is None or name in _PLACEHOLDERS
            or name == engine.info.model_id or name in engine.info.adapters):
        return
    why = dynamic_name_error(name)
    if why is not None:
        raise RequestError(422, "validation", f"adapter '{_short(name)}': {why}")
    try:
        path = resolve_in_roots(roots, name)
    except RequestError as e:
        raise RequestError(422, "validation", f"adapter '{name}': {e.message}") from e
    if not _is_dir(path):
        return  # not a dynamic adapter: validation reports it as unknown
    try:
        await _load(state, name, path)
    except ValueError as e:
        if name not in engine.info.adapters:  # "already loaded" races are fine
            raise RequestError(422, "validation",
                               f"adapter '{name}': {public(str(e), roots)}") from e
    except EngineDeadError as e:
        raise GenerationError(str(e)) from e


def register(app: FastAPI, state: ServerState) -> None:
    from tokenmill.server.app import body_doc

    @app.post("/v1/load_lora_adapter", tags=["lora"],
              openapi_extra=body_doc(LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request) -> Response:
        state.require_ready()
        body: Any = await parse_body(request, LoadLoraAdapterRequest)
        roots = state.config.lora_dynamic_dirs
        if body.lora_name in _PLACEHOLDERS:
            raise _bad(f"'{body.lora_name}' names the base model in requests: choose another "
                       "lora_name")
        path = resolve_in_roots(roots, body.lora_path)
        if not _is_dir(path):
            raise _bad(f"adapter path {_short(body.lora_path)!r}: adapter directory does not "
                       "exist")
        try:
            await _load(state, body.lora_name, path)
        except ValueError as e:
            raise _bad(public(str(e), roots)) from e
        except EngineDeadError as e:
            raise GenerationError(str(e)) from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", tags=["lora"],
              openapi_extra=body_doc(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request) -> Response:
        engine, _, _ = state.require_ready()
        body: Any = await parse_body(request, UnloadLoraAdapterRequest)
        try:
            await engine.unload_adapter(body.lora_name)
        except LookupError as e:
            raise NotFoundError(str(e).strip("'\"")) from e
        except ValueError as e:
            raise _bad(str(e)) from e
        except EngineDeadError as e:
            raise GenerationError(str(e)) from e
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
