"""Finding a model: the embedded default, a local folder or GGUF file, or a Hugging Face Hub id."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tokenmill.loader.default_model import DEFAULT_MODEL_ID, default_model_path
from tokenmill.loader.errors import ModelLoadError
from tokenmill.loader.gguf_weights import (
    gguf_config,
    gguf_generation_config,
    iter_gguf_weights,
    read_gguf,
)
from tokenmill.loader.safetensors_weights import (
    INDEX_NAME,
    find_pickle_checkpoints,
    iter_safetensors_weights,
    safetensors_files,
)

__all__ = ["HUB_ALLOW_PATTERNS", "ModelFormat", "ModelSource", "hub_snapshot", "resolve_model"]

logger = logging.getLogger("tokenmill.loader")

ModelFormat = Literal["hf", "gguf"]

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# What is fetched from the Hub: configs, safetensors weights, tokenizer files, GGUF files.
# Pickle checkpoints (*.bin, *.pt) are never downloaded.
_HUB_FILES = [
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    "*.safetensors",
    INDEX_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
]
HUB_ALLOW_PATTERNS = [*_HUB_FILES, "*.gguf"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read file ({e.strerror or e})", path=path) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})", path=path) from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object", path=path)
    return data


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its files are and how to read them.

    `path` is a folder in Hugging Face layout (`format == "hf"`) or a `.gguf` file
    (`format == "gguf"`).
    """

    model_id: str
    path: Path
    format: ModelFormat

    def config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict (synthesized from the metadata for GGUF)."""
        if self.format == "gguf":
            return gguf_config(self.path)
        return _read_json(self.path / CONFIG_NAME)

    def generation_config(self) -> dict[str, Any]:
        """`generation_config.json`, or `{}`; for GGUF the BOS/EOS ids from the tokenizer."""
        if self.format == "gguf":
            return gguf_generation_config(self.path)
        path = self.path / GENERATION_CONFIG_NAME
        return _read_json(path) if path.is_file() else {}

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, tensor)` pairs with Hugging Face tensor names, one tensor at a time."""
        if self.format == "gguf":
            return iter_gguf_weights(self.path)
        return iter_safetensors_weights(self.path)


# --------------------------------------------------------------------------------------------
# Local files


def _classify_folder(folder: Path, *, hub_hint: str = "",
                     weights: bool = True) -> tuple[Path, ModelFormat]:
    """Decide what a model folder holds and check the files the format needs are there
    (`weights=False`: config.json alone will do, for random weights)."""
    has_config = (folder / CONFIG_NAME).is_file()
    has_safetensors = (folder / INDEX_NAME).is_file() or any(folder.glob("*.safetensors"))
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if not weights and has_config and not has_safetensors and not ggufs:
        _read_json(folder / CONFIG_NAME)
        return folder, "hf"

    if has_config and has_safetensors:
        _read_json(folder / CONFIG_NAME)  # a broken config fails now, not mid-start-up
        safetensors_files(folder)  # raises for a shard missing from the index
        return folder, "hf"
    if len(ggufs) == 1 and not has_safetensors:
        read_gguf(ggufs[0])
        return ggufs[0], "gguf"
    if len(ggufs) > 1 and not has_safetensors:
        names = ", ".join(p.name for p in ggufs[:5]) + (", ..." if len(ggufs) > 5 else "")
        raise ModelLoadError(
            f"{folder}: holds {len(ggufs)} GGUF files ({names}); pass the path of one of them",
            path=folder,
        )
    if has_safetensors:
        raise ModelLoadError(
            f"{folder / CONFIG_NAME}: missing; a Hugging Face model folder needs config.json"
            " next to its *.safetensors",
            path=folder / CONFIG_NAME,
        )
    pickles = find_pickle_checkpoints(folder)
    if pickles:
        raise ModelLoadError(
            f"{pickles[0]}: pickle checkpoints are refused (loading them can run arbitrary"
            " code); convert the model to safetensors or GGUF",
            path=pickles[0],
        )
    if has_config:
        raise ModelLoadError(
            f"{folder / 'model.safetensors'}: missing; {folder} has config.json but no"
            f" *.safetensors weights{hub_hint}",
            path=folder / "model.safetensors",
        )
    raise ModelLoadError(
        f"{folder}: not a model folder (no config.json with *.safetensors, and no .gguf file)"
        f"{hub_hint}",
        path=folder,
    )


def _local_source(model_id: str, path: Path, weights: bool = True) -> ModelSource:
    path = Path(os.path.abspath(path))
    if path.is_dir():
        resolved, fmt = _classify_folder(path, weights=weights)
        return ModelSource(model_id=model_id, path=resolved, format=fmt)
    if path.suffix.lower() == ".gguf":
        read_gguf(path)
        return ModelSource(model_id=model_id, path=path, format="gguf")
    if path.suffix.lower() in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}:
        raise ModelLoadError(
            f"{path}: pickle checkpoints are refused (loading them can run arbitrary code);"
            " convert the model to safetensors or GGUF",
            path=path,
        )
    raise ModelLoadError(
        f"{path}: not a .gguf file; pass a .gguf file or a folder in Hugging Face layout",
        path=path,
    )


def _looks_like_path(model_id: str) -> bool:
    if model_id.startswith(("/", "./", "../", "~", "\\")) or model_id in {".", ".."}:
        return True
    if os.sep != "/" and os.sep in model_id:
        return True
    parts = model_id.split("/")
    if len(parts) > 2 and not parts[-1].lower().endswith(".gguf"):
        return True
    return len(parts) == 1 and model_id.lower().endswith(".gguf")


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as it is now (huggingface_hub itself reads it once, at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        flag = _env_flag(name)
        if flag is not None:
            return flag
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> Path:
    """HF_HUB_CACHE / HF_HOME as they are now (huggingface_hub reads them at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def hub_snapshot(repo_id: str, *, revision: str | None, token: str | None,
                 patterns: list[str], kind: str = "model") -> Path:
    """The local snapshot folder of a Hub repo (the cache, or a download unless
    HF_HUB_OFFLINE); every failure is a one-line ModelLoadError naming the `kind` and id."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    cache = _hub_cache_dir()
    rev = f" (revision {revision!r})" if revision else ""
    what = f"{kind} '{repo_id}'{rev}"
    logger.info("resolving %s from the Hub cache at %s%s", what, cache, " (offline)" * offline)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token or os.environ.get("HF_TOKEN") or None,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=patterns,
        )
    except HFValidationError as e:
        raise ModelLoadError(
            f"'{repo_id}' is neither an existing local path nor a valid Hub {kind} id"
            f" (org/name): {_first_line(e)}"
        ) from e
    except IncompleteSnapshotError as e:
        raise ModelLoadError(
            f"the cached snapshot of {what} in {cache} is incomplete and the Hub cannot be"
            f" reached to complete it: {_first_line(e)}"
        ) from e
    except LocalEntryNotFoundError as e:
        if offline:
            raise ModelLoadError(
                f"{what} is not in the Hub cache at {cache} and HF_HUB_OFFLINE is set"
            ) from e
        raise ModelLoadError(
            f"{what} is not in the Hub cache at {cache} and the Hub could not be reached"
            f" ({_first_line(e.__cause__ or e)})"
        ) from e
    except GatedRepoError as e:
        raise ModelLoadError(
            f"{what} is gated: accept its licence on huggingface.co and pass a token"
            " (HF_TOKEN) of an account that has access"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"revision {revision!r} of {kind} '{repo_id}' was not found") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"{kind} '{repo_id}' was not found on the Hub (or it is private: set HF_TOKEN)"
        ) from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot download {what} from the Hub: {_first_line(e)}") from e
    except OSError as e:
        raise ModelLoadError(f"cannot download {what} into {cache}: {_first_line(e)}") from e
    return Path(folder)


def _hub_source(model_id: str, revision: str | None, token: str | None) -> ModelSource:
    parts = model_id.split("/")
    gguf_file: str | None = None
    repo_id = model_id
    if len(parts) > 2 and parts[-1].lower().endswith(".gguf"):
        repo_id, gguf_file = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = [*_HUB_FILES, gguf_file] if gguf_file else list(HUB_ALLOW_PATTERNS)
    rev = f" (revision {revision!r})" if revision else ""
    what = f"model '{repo_id}'{rev}"
    snapshot = hub_snapshot(repo_id, revision=revision, token=token, patterns=patterns,
                            kind="model")
    if gguf_file is not None:
        path = snapshot / gguf_file
        if not path.is_file():
            raise ModelLoadError(f"{path}: {what} has no file {gguf_file!r}", path=path)
        read_gguf(path)
        return ModelSource(model_id=model_id, path=path, format="gguf")
    hint = (
        f" (from {what}: only safetensors and GGUF weights are fetched; pickle checkpoints such"
        " as pytorch_model.bin are refused)"
    )
    resolved, fmt = _classify_folder(snapshot, hub_hint=hint)
    return ModelSource(model_id=model_id, path=resolved, format=fmt)


# --------------------------------------------------------------------------------------------


def resolve_model(
    model_id: str | None, *, revision: str | None = None, token: str | None = None,
    weights: bool = True,
) -> ModelSource:
    """Find a model and check that its files are there and readable.

    - `None`: the embedded default (SmolLM2-135M-Instruct Q4_1 GGUF), fetched on first use.
    - An existing path: a folder with `config.json` and `*.safetensors` ("hf"), a `.gguf`
      file, or a folder with exactly one `.gguf` and no safetensors ("gguf").
    - Otherwise a Hub id `org/name` (or `org/name/file.gguf` for one GGUF of a repo),
      fetched with `huggingface_hub.snapshot_download`, honouring HF_HOME, HF_HUB_CACHE,
      HF_HUB_OFFLINE and HF_TOKEN.

    `weights=False` (random weights, `--load-format dummy`) also takes a local folder with
    config.json and no weights. Raises `ModelLoadError` with a one-line message for anything
    missing or malformed.
    """
    if model_id is None:
        return ModelSource(model_id=DEFAULT_MODEL_ID, path=default_model_path(), format="gguf")
    if not model_id.strip():
        raise ModelLoadError("empty model id")
    local = Path(model_id).expanduser()
    if local.exists():
        if revision is not None:
            logger.warning("ignoring revision %r for local path %s", revision, local)
        return _local_source(model_id, local, weights)
    if _looks_like_path(model_id):
        raise ModelLoadError(f"{local}: no such file or directory", path=local)
    return _hub_source(model_id, revision, token)
