"""Loading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Only plain LoRA on the seven Llama projections is accepted; everything that would change the
model in another way (DoRA, modules_to_save, trained biases, embedding / lm_head targets, ...)
is refused with an `AdapterError` naming the file and field, never silently ignored.

Module matching follows PEFT (`peft.tuners.tuners_utils.check_target_module_exists` and
`peft.utils.other.get_pattern_key`): full module names look like
`model.layers.3.self_attn.q_proj`; a string `target_modules` must `re.fullmatch` the name, a list
matches the name exactly or on a `.`-separated suffix; `rank_pattern` / `alpha_pattern` keys are
regexes matched as `(.*\\.)?(key)$`.

`fan_in_fan_out` only says that the *base* weight is stored transposed (GPT-2 Conv1D); PEFT's
lora_A / lora_B are always nn.Linear-shaped ([r, in] and [out, r]) and it transposes the delta,
not the factors. Our modules are nn.Linear-shaped, so the flag needs no action here (PEFT itself
resets it to False on nn.Linear targets)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_NAME_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<mod>\w+)$")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names the file and field at fault."""


@dataclass
class LoraAdapter:
    name: str
    rank: int  # the largest rank over all modules
    # (layer, module) -> (A [r, in], B [out, r], scale)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


def module_name(layer: int, module: str) -> str:
    """The PEFT-visible full name of a Llama projection."""
    return f"model.layers.{layer}.{_PARENT[module]}.{module}"


def resolve_adapter_path(root: Path, requested: str) -> Path:
    """Resolve `requested` (relative to `root`, or absolute inside it) and refuse anything that
    leaves `root`: absolute paths elsewhere, `..` escapes and symlinks pointing outside."""
    if not requested or "\x00" in requested:
        raise AdapterError(f"adapter path {requested!r} is empty or invalid")
    root_real = Path(os.path.realpath(root))
    req = Path(requested)
    candidate = req if req.is_absolute() else root_real / req
    real = Path(os.path.realpath(candidate))
    if real != root_real and root_real not in real.parents:
        raise AdapterError(f"adapter path {requested!r} resolves outside the adapter root {root}")
    return real


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """TGI's `--lora-adapters` entries → (name, location): `name=path_or_hub_id`, a local path
    (named after its folder), or a plain Hub id, optionally `@revision` (named after the id)."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        if spec.count("=") > 1 or spec.count("@") > 1:
            raise AdapterError(f"--lora-adapters: invalid LoRA adapter format {spec!r}")
        name, sep, where = (part.strip() for part in spec.partition("="))
        if not sep:
            where = name
            local = Path(where).expanduser()
            name = local.name if local.exists() else where.partition("@")[0]
        if not name or not where:
            raise AdapterError(f"--lora-adapters: {spec!r} is not name=path, a path or a Hub id")
        if any(n == name for n, _ in out):
            raise AdapterError(f"--lora-adapters: adapter name {name!r} is given twice")
        out.append((name, where))
    return out


def adapter_location(where: str) -> Path:
    """A local adapter folder, or a Hub adapter repo `org/name[@revision]` found in (or
    fetched into) the Hub cache, HF_HUB_OFFLINE honoured; ModelLoadError when it cannot be."""
    local = Path(where).expanduser()
    repo, _, revision = where.partition("@")
    if local.exists() or where.startswith(("/", ".", "~")) or repo.count("/") != 1:
        return local
    from tokenmill.loader.source import hub_snapshot

    return hub_snapshot(repo, revision=revision or None, token=None, kind="LoRA adapter",
                        patterns=[CONFIG_NAME, WEIGHTS_NAME])


def _fail(path: Path, field: str, why: str) -> AdapterError:
    return AdapterError(f"{path}: {field}: {why}")


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing {CONFIG_NAME} in adapter directory {path}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    return cfg


def _check_config(cfg_path: Path, cfg: dict[str, Any]) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise _fail(cfg_path, "peft_type", f"{peft_type!r} is not supported (only 'LORA')")
    if cfg.get("use_dora"):
        raise _fail(cfg_path, "use_dora", "DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise _fail(cfg_path, "modules_to_save",
                    f"{cfg['modules_to_save']!r}: fully trained modules are not supported")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise _fail(cfg_path, "bias", f"{bias!r} is not supported (only 'none')")
    for field in ("lora_bias", "target_parameters", "trainable_token_indices",
                  "layer_replication", "use_qalora"):
        if cfg.get(field):
            raise _fail(cfg_path, field, f"{cfg[field]!r} is not supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _fail(cfg_path, "r", f"{r!r} must be a positive integer")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(cfg_path, "lora_alpha", f"{alpha!r} must be a finite number")
    for field in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(field) or {}
        if not isinstance(pat, dict):
            raise _fail(cfg_path, field, "must be an object")
        for key, val in pat.items():
            try:
                re.compile(key)
            except re.error as e:
                raise _fail(cfg_path, field, f"bad pattern {key!r}: {e}") from e
            bad = not isinstance(val, int | float) or isinstance(val, bool) or val <= 0
            if bad or (field == "rank_pattern" and not isinstance(val, int)):
                raise _fail(cfg_path, field, f"{key!r}: bad value {val!r}")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as e:
            raise _fail(cfg_path, "target_modules", f"bad regex {tm!r}: {e}") from e
    elif not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
        raise _fail(cfg_path, "target_modules", f"{tm!r} must be a regex or a list of names")


def _list_match(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{t}") for t in names)


def _targeted(cfg: dict[str, Any], key: str) -> bool:
    """PEFT's check_target_module_exists, restricted to what we support."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif _list_match(list(exclude), key):
            return False
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        if tm == "all-linear":
            return True
        return re.fullmatch(tm, key) is not None
    if not _list_match(tm, key):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = cfg.get("layers_pattern")
    m: re.Match[str] | None = None
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    if m is None:
        return False
    idx = int(m.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_value(patterns: dict[str, Any], key: str, default: float) -> float:
    # peft.utils.other.get_pattern_key: first key matching `(.*\.)?(key)$` wins.
    for pat in patterns:
        if re.match(rf"(.*\.)?({pat})$", key):
            return float(patterns[pat])
    return float(patterns.get(key, default))


def _check_list_targets(cfg_path: Path, cfg: dict[str, Any], candidates: list[str]) -> None:
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        return
    for t in tm:
        if not any(c == t or c.endswith(f".{t}") for c in candidates):
            raise _fail(cfg_path, "target_modules",
                        f"{t!r} is not supported (only {', '.join(SUPPORTED_MODULES)})")


def load_peft_adapter(path: Path, name: str, *, num_layers: int,
                      module_shapes: dict[str, tuple[int, int]],
                      dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Load and validate a PEFT LoRA adapter directory.

    `module_shapes` maps each base-model projection name (q_proj, ..., down_proj) to its
    (in_features, out_features); the adapter's tensors must match them."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory does not exist")
    for mod in module_shapes:
        if mod not in SUPPORTED_MODULES:
            raise ValueError(f"module_shapes: unsupported module {mod!r}")
    cfg = _read_config(path)
    cfg_path = path / CONFIG_NAME
    _check_config(cfg_path, cfg)

    st_path = path / WEIGHTS_NAME
    if not st_path.is_file():
        pickles = [p for p in _PICKLE_NAMES if (path / p).exists()]
        if pickles:
            raise AdapterError(f"{path / pickles[0]}: pickle adapter weights are refused for "
                               f"safety; convert to {WEIGHTS_NAME}")
        raise AdapterError(f"{st_path}: missing {WEIGHTS_NAME} in adapter directory {path}")

    candidates = {module_name(i, m): (i, m) for i in range(num_layers) for m in module_shapes}
    _check_list_targets(cfg_path, cfg, list(candidates))
    targeted = {k: v for k, v in candidates.items() if _targeted(cfg, k)}
    if not targeted:
        raise _fail(cfg_path, "target_modules", "matches no supported module of the base model")

    tensors = _read_safetensors(st_path)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterError(f"{st_path}: key {key!r} is not a LoRA A/B weight we support")
        mod_key = m.group("module")
        if mod_key not in candidates:
            raise AdapterError(f"{st_path}: key {key!r} targets {mod_key!r}, which is not a "
                               f"supported module of the base model")
        if mod_key not in targeted:
            raise AdapterError(f"{st_path}: key {key!r} is not selected by target_modules / "
                               f"layers_to_transform in {CONFIG_NAME}")
        found.setdefault(mod_key, {})[m.group("ab")] = t

    r_default = int(cfg["r"])
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for mod_key, (layer, mod) in targeted.items():
        ab = found.get(mod_key, {})
        for part in ("A", "B"):
            if part not in ab:
                raise AdapterError(f"{st_path}: missing base_model.model.{mod_key}.lora_{part}"
                                   f".weight")
        a, b = ab["A"], ab["B"]
        r = int(_pattern_value(rank_pattern, mod_key, r_default))
        alpha = _pattern_value(alpha_pattern, mod_key, alpha_default)
        fan_in, fan_out = module_shapes[mod]
        if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            raise AdapterError(
                f"{st_path}: {mod_key}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"match expected ({r}, {fan_in}) / ({fan_out}, {r}) (r from {CONFIG_NAME}; "
                f"adapter trained for a different base model?)")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{st_path}: {mod_key}: LoRA weights must be floating point")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterError(f"{st_path}: {mod_key}: non-finite values in LoRA weights")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        weights[(layer, mod)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous(), scale)

    rank = max(a.shape[0] for a, _, _ in weights.values())
    return LoraAdapter(name=name, rank=rank, weights=weights)


def _read_safetensors(st_path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(st_path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                out[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        raise AdapterError(f"{st_path}: unreadable or corrupt safetensors file: {e}") from e
    if not out:
        raise AdapterError(f"{st_path}: contains no tensors")
    return out
