"""Adapter files: surgeon's own format (safetensors + adapter_config.json) and PEFT folders.

surgeon format: `adapter.safetensors` with keys `<module path>.<param>` and `adapter_config.json`
with the kind, adapter-wide options and per-site options. PEFT format: `adapter_model.safetensors`
with keys `base_model.model.<path>.<PEFT name>` (e.g. `lora_A.weight`, `hada_w1_a`, `oft_R.weight`)
plus model-level ones (`base_model.vera_A`, prefix tuning's `prompt_embeddings`), and PEFT's
adapter_config.json; each peft_type's layout is one entry of surgeon.adapters.peft_formats.
A checkpoint that names no modules (prefix tuning) keys its weights by ordinal, "#k": insert
gives them to the k-th site the adapter's targets select, in graph order.
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
    weights: dict[str, dict[str, torch.Tensor]]    # module path (or "#k": the k-th site) -> param -> tensor
    site_options: dict[str, dict[str, Any]]        # module path -> per-site option overrides


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SpecError("<adapter>", f"'{path}' is missing")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:   # bad JSON, bad UTF-8, or nested past the parser's depth
        raise SpecError("<adapter>", f"'{path}' is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise SpecError("<adapter>", f"'{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(path: Path, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SpecError("<adapter>", f"'{path}' is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise SpecError("<adapter>", f"'{path}' is not a readable safetensors file: {error}") from error
    if not allow_nonfinite:
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not _isfinite(tensor).all():
                raise SpecError("<adapter>", f"'{path}': tensor '{key}' holds NaN or Inf values; re-export the "
                                             "adapter, or load it as it is with allow_nonfinite=True")
    return tensors


def _isfinite(tensor: torch.Tensor) -> torch.Tensor:
    """torch.isfinite, float8 formats (which it does not take) through float32."""
    return torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor)


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)   # mkstemp makes it owner-only; adapter files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- surgeon's own format

def save_adapter_dir(directory: Path, name: str, kind: str, options: dict,
                     weights: dict[str, dict[str, torch.Tensor]], site_options: dict[str, dict]) -> None:
    """Write one adapter as adapter.safetensors + adapter_config.json (a kind's shared tensors once each)."""
    directory = Path(directory)
    own, shared, held_by = _split_shared(kind, weights)
    flat = _unshared({**{f"{path}.{p}": t for path, ps in own.items() for p, t in ps.items()}, **shared})
    config = {"surgeon_adapter": FORMAT_VERSION, "name": name, "type": kind, "options": options,
              "targets": sorted(weights), "site_options": site_options}
    if held_by:
        config["shared"] = held_by
    _write_atomic(directory / "adapter.safetensors", lambda tmp: save_file(flat, tmp))
    _write_atomic(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def load_adapter_dir(directory: Path, allow_nonfinite: bool = False) -> LoadedAdapter:
    """Read an adapter folder written by save_adapter_dir (a NaN or Inf weight is refused unless allowed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SpecError("<adapter>", f"adapter folder '{directory}' does not exist")
    config = _read_json(directory / "adapter_config.json")
    if config.get("surgeon_adapter") != FORMAT_VERSION or "type" not in config or "targets" not in config:
        raise SpecError("<adapter>", f"'{directory / 'adapter_config.json'}' is not a surgeon adapter config "
                                     "(for a PEFT folder use from_peft)")
    flat = _read_tensors(directory / "adapter.safetensors", allow_nonfinite)
    weights = _join_shared(flat, config.get("shared", []), config["targets"], directory)
    for key, tensor in flat.items():
        path, _, param = key.rpartition(".")
        weights.setdefault(path, {})[param] = tensor
    if sorted(weights) != sorted(config["targets"]):
        raise SpecError("<adapter>", f"'{directory}': weights name modules {sorted(weights)[:3]}... "
                                     f"but the config lists {config['targets'][:3]}...")
    entry = {"type": config["type"], "targets": list(config["targets"]), **config.get("options", {})}
    return LoadedAdapter(entry, weights, config.get("site_options", {}))


SHARED = "@shared"   # key prefix of a tensor stored once for every site that reads it (no module path has "@")


def _split_shared(kind: str, weights: dict[str, dict[str, torch.Tensor]]):
    """(per-site tensors without the kind's shared ones, {key: shared tensor}, [{tensor, param, modules}]): each
    distinct shared tensor (VeRA's projections of a shape, VB-LoRA's bank) once, with the sites that read it."""
    from .adapters import kinds

    table = kinds()
    names = table[kind].shared if kind in table else frozenset()
    own = {path: {p: t for p, t in params.items() if p not in names} for path, params in weights.items()}
    shared: dict[str, torch.Tensor] = {}
    held_by: list[dict] = []
    for pname in sorted(names):
        copies: list[tuple[torch.Tensor, list[str]]] = []
        for path, params in weights.items():
            if pname not in params:
                continue
            tensor = params[pname]
            same = next((paths for held, paths in copies if held is tensor or (
                held.shape == tensor.shape and held.dtype == tensor.dtype and torch.equal(held, tensor))), None)
            if same is None:
                copies.append((tensor, [path]))
            else:
                same.append(path)
        for i, (tensor, paths) in enumerate(copies):
            key = f"{SHARED}.{pname}.{i}"
            shared[key] = tensor
            held_by.append({"tensor": key, "param": pname, "modules": paths})
    return own, shared, held_by


def _join_shared(flat: dict[str, torch.Tensor], held_by: Any, targets: list, directory: Path) -> dict:
    """Take the shared tensors out of `flat` and give each to the sites that read it (one tensor, read once)."""
    weights: dict[str, dict[str, torch.Tensor]] = {}
    if not isinstance(held_by, list):
        raise SpecError("<adapter>", f"'{directory / 'adapter_config.json'}': 'shared' must be a list, got {held_by!r}")
    for entry in held_by:
        key = entry.get("tensor") if isinstance(entry, dict) else None
        modules = entry.get("modules") if isinstance(entry, dict) else None
        if not isinstance(key, str) or key not in flat or not isinstance(entry.get("param"), str) \
                or not isinstance(modules, list) or not all(isinstance(m, str) and m in targets for m in modules):
            raise SpecError("<adapter>", f"'{directory}': shared entry {entry!r} names no tensor of "
                                         "adapter.safetensors, or modules that are not the adapter's targets")
        tensor = flat.pop(key)
        for path in modules:
            weights.setdefault(path, {})[entry["param"]] = tensor
    return weights


# ---------------------------------------------------------------- PEFT folders

def load_peft_dir(directory: Path, allow_nonfinite: bool = False) -> LoadedAdapter:
    """Read a PEFT checkpoint folder (adapter_config.json + adapter_model.safetensors).

    Supported peft_types and their layouts are in surgeon.adapters.peft_formats. A NaN or Inf
    weight is refused unless allow_nonfinite.
    """
    from .adapters.peft_formats import BY_PEFT_TYPE

    directory = Path(directory)
    if not directory.is_dir():
        raise SpecError("<adapter>", f"PEFT folder '{directory}' does not exist")
    config = _read_json(directory / "adapter_config.json")
    if config.get("peft_type") == "XLORA":   # LoRA expert subfolders and a classifier: its own layout
        from .adapters.xlora_peft import read_xlora_dir

        flat = _read_tensors(directory / "adapter_model.safetensors", allow_nonfinite)
        return LoadedAdapter(*read_xlora_dir(directory, config, flat,
                                             lambda lora: load_peft_dir(lora, allow_nonfinite)))
    fmt = BY_PEFT_TYPE.get(config.get("peft_type"))
    if fmt is None:
        raise SpecError("<adapter>", f"'{directory}': peft_type {config.get('peft_type')!r} is not supported; "
                                     f"surgeon imports {sorted(BY_PEFT_TYPE)}")
    if config.get("modules_to_save"):
        raise SpecError("<adapter>", f"'{directory}': modules_to_save {config['modules_to_save']} is not supported "
                                     "(whole modules trained beside the adapter, e.g. the classifier head PEFT's "
                                     "SEQ_CLS task saves: surgeon imports adapters, not module copies)")
    if config.get("bias", "none") != "none":
        raise SpecError("<adapter>", f"'{directory}': bias={config['bias']!r} is not supported (only 'none')")
    weights, extras = _split_peft_keys(_read_tensors(directory / "adapter_model.safetensors", allow_nonfinite),
                                      fmt, directory)
    try:
        entry, site_options = fmt.read(config, weights, extras)
    except SpecError as error:
        raise SpecError("<adapter>", f"'{directory}': {str(error).split(': ', 1)[-1]}") from error
    if not weights and fmt.names:
        raise _no_weights(directory, fmt)
    return LoadedAdapter({"targets": sorted(weights), **entry}, weights, site_options)


def _split_peft_keys(flat: dict[str, torch.Tensor], fmt, directory: Path):
    """Module path -> surgeon param name -> tensor, and the model-level tensors (VeRA's A, B)."""
    by_suffix = {suffix: name for name, suffix in fmt.names.items()}
    pattern = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+?)\.({'|'.join(map(re.escape, by_suffix))})$")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in flat.items():
        match = pattern.fullmatch(_drop_adapter_name(key, by_suffix))
        if match:
            weights.setdefault(match.group(1), {})[by_suffix[match.group(2)]] = tensor
        elif key.startswith(fmt.model_prefix) and _model_level(fmt, key[len(fmt.model_prefix):]):
            extras[key[len(fmt.model_prefix):]] = tensor
        else:
            raise SpecError("<adapter>", f"'{directory}': unexpected tensor '{key}' in a {fmt.peft_type} checkpoint")
    if not weights and fmt.names and not extras:   # a format without per-module tensors (prefix tuning) checks
        raise _no_weights(directory, fmt)             # its own; one with model-level ones tells why in its reader
    return weights, extras


def _no_weights(directory: Path, fmt) -> SpecError:
    return SpecError("<adapter>", f"'{directory}/adapter_model.safetensors' holds no {fmt.peft_type} weights")


def _model_level(fmt, name: str) -> bool:
    """Whether `name` is one of the format's model-level tensors; an entry ending in ".N" stands for numbered
    ones (TinyLoRA's tinylora_v.0, tinylora_v.1 ...: one per weight-tying group), one ending in ".*" for
    named ones (FRoD's frod_V.self_attn_q_proj: one per module role)."""
    return any(name == entry or (entry.endswith(".N") and re.fullmatch(rf"{re.escape(entry[:-2])}\.\d+", name))
               or (entry.endswith(".*") and re.fullmatch(rf"{re.escape(entry[:-2])}\.\w+", name))
               for entry in fmt.model_level)


def _drop_adapter_name(key: str, suffixes) -> str:
    """'x.lora_A.default.weight' -> 'x.lora_A.weight' (PEFT keys saved with the adapter name)."""
    for suffix in suffixes:
        head, _, tail = suffix.partition(".")
        match = re.fullmatch(rf"(.+\.{re.escape(head)})\.[A-Za-z_]\w*" + (rf"\.{re.escape(tail)}" if tail else ""),
                             key)
        if match and not key.endswith("." + suffix):
            return f"{match.group(1)}{'.' + tail if tail else ''}"
    return key


def save_peft_dir(directory: Path, options: dict, weights: dict[str, dict[str, torch.Tensor]],
                  transposed_paths: set[str], kind: str = "lora", site_options: dict | None = None) -> None:
    """Write an adapter as a PEFT checkpoint folder that peft.PeftModel.from_pretrained loads."""
    from .adapters.mosa import is_mosa
    from .adapters.peft_formats import BY_KIND

    if kind == "xlora":   # LoRA expert subfolders and a classifier: its own layout
        from .adapters.xlora_peft import write_xlora_dir

        return write_xlora_dir(Path(directory), options, weights, site_options or {}, transposed_paths, save_peft_dir)
    fmt = BY_KIND.get(kind)
    if fmt is None:
        raise SpecError("<adapter>", f"PEFT has no format for a {kind!r} adapter; exportable: {sorted(BY_KIND)}")
    directory = Path(directory)
    # MoSA's module assignments have no PEFT name: PEFT gets the dense adapter, the function MoSA has in eval
    weights = {path: {p: t for p, t in params.items() if not is_mosa(p)} for path, params in weights.items()}
    config, extras = fmt.write(kind, options, weights, site_options or {})
    flat = {f"{PEFT_PREFIX}{path}.{fmt.names[p]}": t for path, ps in weights.items() for p, t in ps.items()}
    flat.update({f"{fmt.model_prefix}{name}": t for name, t in extras.items()})
    common = {"bias": "none", "fan_in_fan_out": bool(transposed_paths)}   # where the config class has them
    modules = {"target_modules": sorted(weights)} if fmt.names else {}   # none for a model-level table
    config = {"peft_type": fmt.peft_type, "task_type": None, **modules, "modules_to_save": None,
              **{k: v for k, v in common.items() if k in fmt.config_keys}, **config}
    _write_atomic(directory / "adapter_model.safetensors", lambda tmp: save_file(_unshared(flat), tmp))
    _write_atomic(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def _unshared(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for key, tensor in flat.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out
