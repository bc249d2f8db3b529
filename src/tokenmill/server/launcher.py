"""`tokenmill serve`: uvicorn around the app, with the engine's lifecycle.

The HTTP port opens first, so `/health` can answer 503 while the model loads. SIGTERM stops
new work at once (health turns 503, new requests get 503) and lets running streams finish
within the grace period, then exits 0. If the engine dies, the server turns unhealthy, stops
and the process exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from typing import Any

import uvicorn

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.server.app import ServerState, create_app
from tokenmill.server.logs import setup_logging

logger = logging.getLogger("tokenmill.server")


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when SIGTERM/SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutting down, which would end the
        # process with -SIGTERM; a graceful drain is a clean exit (0), as in TGI.
        self._captured_signals.clear()


async def _start_engine(state: ServerState, engine_cfg: EngineConfig,
                        server: _Server) -> None:
    try:
        if state.config.engine_mode == "thread":
            from tokenmill.frontend.async_llm import AsyncLLM

            engine: Any = await asyncio.to_thread(AsyncLLM.from_config, engine_cfg)
        else:
            from tokenmill.frontend.mp_client import MPAsyncLLM

            engine = await MPAsyncLLM.start(engine_cfg, engine_cpus=_pin_api_process())
    except Exception as e:  # the model could not load: nothing to serve
        logger.error("engine failed to start: %s", e)
        state.fatal = str(e)
        state.exit_code = 1
        server.should_exit = True
        return

    def on_dead() -> None:
        logger.error("the engine process died; shutting down")
        state.fatal = "the engine died"
        state.exit_code = 1
        server.should_exit = True

    engine.on_dead = on_dead
    state.attach(engine)
    # As the engine process does after loading (runner/loading.freeze_startup_objects): keep
    # the tokenizer's and the app's start-up objects out of every full collection.
    gc.collect()
    gc.freeze()
    logger.info("ready: %s on %s (%s), max_total_tokens=%d",
                engine.info.model_id, engine.info.device, engine.info.dtype,
                state.limits.max_total_tokens if state.limits else -1)


def _pin_api_process() -> set[int] | None:
    """Keep this process off the engine's cores (on machines with 4 or more); returns the
    engine's share, for the engine process started next (None: both share every core)."""
    from tokenmill.engine.proc import split_cores

    try:
        cores = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    api, engine = split_cores(cores)
    if api == engine:
        return None
    os.sched_setaffinity(0, api)
    logger.info("cores: API process %s, engine %s", sorted(api), sorted(engine))
    return engine


def run_server(engine_cfg: EngineConfig, cfg: ServerConfig) -> int:
    setup_logging(cfg.json_output)
    state = ServerState(cfg)
    app = create_app(state)
    uv_config = uvicorn.Config(
        app, host=cfg.hostname, port=cfg.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=int(cfg.graceful_termination_timeout),
        h11_max_incomplete_event_size=64 * 1024, lifespan="on")
    server = _Server(uv_config, state)

    async def main() -> None:
        starter = asyncio.create_task(_start_engine(state, engine_cfg, server))
        try:
            await server.serve()
        finally:
            starter.cancel()
            await state.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    if state.exit_code:
        print(f"tokenmill: {state.fatal or 'fatal error'}", file=sys.stderr)
    return state.exit_code
