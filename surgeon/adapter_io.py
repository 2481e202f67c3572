"""Adapter files: surgeon's own format (safetensors + adapter_config.json) and PEFT LoRA folders.

surgeon format: `adapter.safetensors` with keys `<module path>.<param>` and `adapter_config.json`
with the kind, adapter-wide options and per-site options. PEFT format: `adapter_model.safetensors`
with keys `base_model.model.<path>.lora_A.weight` / `lora_B.weight` and PEFT's adapter_config.json.
Writes go to a temporary file first and are renamed into place, so a failure leaves no
half-written file under the final name.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SpecError

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."


@dataclass
class LoadedAdapter:
    entry: dict[str, Any]                          # spec keys: type, targets, options
    weights: dict[str, dict[str, torch.Tensor]]    # module path -> param name -> tensor
    site_options: dict[str, dict[str, Any]]        # module path -> per-site option overrides


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SpecError("<adapter>", f"'{path}' is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SpecError("<adapter>", f"'{path}' is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise SpecError("<adapter>", f"'{path}' must hold a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SpecError("<adapter>", f"'{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise SpecError("<adapter>", f"'{path}' is not a readable safetensors file: {error}") from error


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- surgeon's own format

def save_adapter_dir(directory: Path, name: str, kind: str, options: dict,
                     weights: dict[str, dict[str, torch.Tensor]], site_options: dict[str, dict]) -> None:
    """Write one adapter as adapter.safetensors + adapter_config.json."""
    directory = Path(directory)
    flat = {f"{path}.{p}": t.detach().contiguous().cpu() for path, ps in weights.items() for p, t in ps.items()}
    config = {"surgeon_adapter": FORMAT_VERSION, "name": name, "type": kind, "options": options,
              "targets": sorted(weights), "site_options": site_options}
    _write_atomic(directory / "adapter.safetensors", lambda tmp: save_file(flat, tmp))
    _write_atomic(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def load_adapter_dir(directory: Path) -> LoadedAdapter:
    """Read an adapter folder written by save_adapter_dir."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SpecError("<adapter>", f"adapter folder '{directory}' does not exist")
    config = _read_json(directory / "adapter_config.json")
    if config.get("surgeon_adapter") != FORMAT_VERSION or "type" not in config or "targets" not in config:
        raise SpecError("<adapter>", f"'{directory / 'adapter_config.json'}' is not a surgeon adapter config "
                                     "(for a PEFT folder use from_peft)")
    flat = _read_tensors(directory / "adapter.safetensors")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        path, _, param = key.rpartition(".")
        weights.setdefault(path, {})[param] = tensor
    if sorted(weights) != sorted(config["targets"]):
        raise SpecError("<adapter>", f"'{directory}': weights name modules {sorted(weights)[:3]}... "
                                     f"but the config lists {config['targets'][:3]}...")
    entry = {"type": config["type"], "targets": list(config["targets"]), **config.get("options", {})}
    return LoadedAdapter(entry, weights, config.get("site_options", {}))


# ---------------------------------------------------------------- PEFT LoRA folders

def _peft_pattern(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_peft_dir(directory: Path) -> LoadedAdapter:
    """Read a PEFT LoRA checkpoint folder (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SpecError("<adapter>", f"PEFT folder '{directory}' does not exist")
    config = _read_json(directory / "adapter_config.json")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise SpecError("<adapter>", f"'{directory}': peft_type {peft_type!r} is not supported; surgeon imports LORA")
    if config.get("use_dora"):
        raise SpecError("<adapter>", f"'{directory}': use_dora is set; DoRA import is not supported yet")
    if config.get("modules_to_save"):
        raise SpecError("<adapter>", f"'{directory}': modules_to_save {config['modules_to_save']} is not supported")
    if config.get("bias", "none") != "none":
        raise SpecError("<adapter>", f"'{directory}': bias={config['bias']!r} is not supported (only 'none')")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise SpecError("<adapter>", f"'{directory}/adapter_config.json': 'r' and 'lora_alpha' must be numbers")
    flat = _read_tensors(directory / "adapter_model.safetensors")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[A-Za-z_]\w*)?\.weight", key)
        if not match:
            raise SpecError("<adapter>", f"'{directory}': unexpected tensor '{key}' in a LoRA checkpoint")
        weights.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not weights:
        raise SpecError("<adapter>", f"'{directory}/adapter_model.safetensors' holds no LoRA weights")
    site_options = {}
    for path, params in weights.items():
        if set(params) != {"lora_A", "lora_B"} or params["lora_A"].dim() != 2:
            raise SpecError("<adapter>", f"'{directory}': module '{path}' needs 2-D lora_A and lora_B weights")
        rank = params["lora_A"].shape[0]
        alpha = _peft_pattern(config.get("alpha_pattern"), path, config["lora_alpha"])
        if rank != config["r"] or alpha != config["lora_alpha"]:
            site_options[path] = {"rank": rank, "alpha": float(alpha)}
    entry = {"type": "lora", "targets": sorted(weights), "rank": config["r"],
             "alpha": float(config["lora_alpha"]), "use_rslora": bool(config.get("use_rslora", False))}
    return LoadedAdapter(entry, weights, site_options)


def save_peft_dir(directory: Path, options: dict, weights: dict[str, dict[str, torch.Tensor]],
                  transposed_paths: set[str]) -> None:
    """Write a LoRA adapter as a PEFT checkpoint folder that peft.PeftModel.from_pretrained loads."""
    directory = Path(directory)
    flat = {f"{PEFT_PREFIX}{path}.{p}.weight": t.detach().contiguous().cpu()
            for path, ps in weights.items() for p, t in ps.items()}
    ranks = {path: ps["lora_A"].shape[0] for path, ps in weights.items()}
    config = {
        "peft_type": "LORA", "task_type": None, "r": options["rank"],
        "lora_alpha": options["alpha"] if options["alpha"] is not None else options["rank"],
        "target_modules": sorted(weights), "use_rslora": options["use_rslora"], "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": bool(transposed_paths), "init_lora_weights": True,
        "rank_pattern": {p: r for p, r in ranks.items() if r != options["rank"]}, "alpha_pattern": {},
        "modules_to_save": None, "use_dora": False,
    }
    _write_atomic(directory / "adapter_model.safetensors", lambda tmp: save_file(flat, tmp))
    _write_atomic(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
