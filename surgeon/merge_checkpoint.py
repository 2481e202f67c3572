"""Merge an adapter into a safetensors checkpoint on disk, one tensor at a time.

`merge_checkpoint(base_dir, adapter_dir, out_dir)`: base_dir holds `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`;
adapter_dir is a surgeon adapter folder (save_adapter, or save_quantized_adapter) or a PEFT
LoRA folder. The merged weight of module P is `P.weight` + the kind's delta weight, computed
exactly as the merge pass does: W' = (W.double() + dW.double()).to(W.dtype), so the result
equals an in-memory merge bit for bit.

Guarantees:
- memory: each tensor is read through its own short-lived safe_open handle (so no mapping of
  a whole shard stays resident), merged, and written straight into the output file, whose
  header is computed up front from the input headers; peak memory is a small multiple of the
  largest tensor (the tensor, its float64 copy, the delta and its float64 copy), never a shard;
- layout: the same shard files with the same tensor names, dtypes and shapes, the index file
  and every other top-level file copied byte for byte; untouched tensors are copied bit for bit;
- safety: inputs are only read; everything is written into a temporary sibling folder that is
  renamed to out_dir at the end and removed on any failure, so out_dir is complete or absent;
  an existing out_dir is refused.

Weight layout: nn.Linear stores W as out x in, GPT-2's Conv1D as in x out. For non-square
weights the adapter's parameter shapes decide; square ones follow PEFT's `fan_in_fan_out`,
else the layout the adapter's non-square weights showed, else out x in.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .adapter_io import LoadedAdapter, load_adapter_dir, load_peft_dir
from .adapters import AdapterKind, kinds
from .errors import SurgeonError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass
class Adapter:
    """An adapter read from disk: its kind, per-module parameters and options."""

    kind: AdapterKind
    weights: dict[str, dict[str, torch.Tensor]]
    options: dict[str, dict]
    fan_in_fan_out: bool | None


@dataclass
class Target:
    """One tensor the merge rewrites: module path, role ('weight' or 'bias'), layout."""

    path: str
    role: str
    transposed: bool = False


@dataclass
class MergeSummary:
    out_dir: Path
    shards: list[str]
    merged: list[str] = field(default_factory=list)
    copied: int = 0
    bytes_written: int = 0


def merge_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                     fan_in_fan_out: bool | None = None) -> MergeSummary:
    """Write base + adapter delta to out_dir, shard by shard and tensor by tensor."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise SurgeonError(f"merge-checkpoint: output folder '{out_dir}' exists; refusing to overwrite it")
    shards = _shard_files(base_dir)
    headers = {shard: _read_header(base_dir / shard) for shard in shards}
    adapter = read_adapter(Path(adapter_dir))
    if fan_in_fan_out is not None:
        adapter.fan_in_fan_out = fan_in_fan_out
    plan = plan_targets(adapter, {name: shape for h in headers.values() for name, (_, shape) in h[0].items()})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    summary = MergeSummary(out_dir, shards)
    try:
        for shard in shards:
            _write_shard(base_dir / shard, tmp / shard, headers[shard], plan, adapter, summary)
        for other in sorted(base_dir.iterdir()):
            if other.is_file() and other.name not in shards:
                shutil.copyfile(other, tmp / other.name)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ---------------------------------------------------------------- reading

def _shard_files(base_dir: Path) -> list[str]:
    if (base_dir / INDEX).is_file():
        index = json.loads((base_dir / INDEX).read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SurgeonError(f"merge-checkpoint: '{base_dir / INDEX}' has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (base_dir / s).is_file()]
        if missing:
            raise SurgeonError(f"merge-checkpoint: shards {missing} named by '{base_dir / INDEX}' are missing")
        return shards
    if (base_dir / SINGLE).is_file():
        return [SINGLE]
    raise SurgeonError(f"merge-checkpoint: '{base_dir}' has neither {INDEX} nor {SINGLE}")


def _read_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict | None]:
    """(tensor name -> (safetensors dtype, shape)) and the file's metadata, without reading data."""
    with safe_open(str(path), framework="pt") as handle:
        entries = {}
        for name in handle.keys():
            view = handle.get_slice(name)
            entries[name] = (view.get_dtype(), list(view.get_shape()))
        return entries, handle.metadata()


def read_adapter(adapter_dir: Path) -> Adapter:
    """A surgeon (plain or quantized) or PEFT LoRA adapter folder, with per-module options."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise SurgeonError(f"merge-checkpoint: '{config_path}' is missing")
    config = json.loads(config_path.read_text())
    flag = None
    if "peft_type" in config:
        loaded = load_peft_dir(adapter_dir)
        flag = bool(config.get("fan_in_fan_out", False))
    elif isinstance(config.get("quantized"), dict):
        from .quantized_io import load_quantized_adapter

        loaded = load_quantized_adapter(adapter_dir)
    else:
        loaded = load_adapter_dir(adapter_dir)
    kind = kinds()[loaded.entry["type"]]
    options = _site_options(kind, loaded)
    reason = next((r for o in options.values() if (r := kind.refusal(o))), "")
    if reason:
        raise SurgeonError(f"merge-checkpoint: a {kind.name} adapter cannot be merged: {reason}")
    return Adapter(kind, loaded.weights, options, flag)


def _site_options(kind: AdapterKind, loaded: LoadedAdapter) -> dict[str, dict]:
    base = {key: loaded.entry.get(key, option.default) for key, option in kind.options.items()}
    return {path: {**base, **loaded.site_options.get(path, {})} for path in loaded.weights}


def plan_targets(adapter: Adapter, shapes: dict[str, list[int]]) -> dict[str, Target]:
    """Checkpoint tensor name -> how to rewrite it; every adapter module must be found."""
    layouts: dict[str, bool | None] = {}
    for path in adapter.weights:
        name = f"{path}.weight"
        if name not in shapes or len(shapes[name]) != 2:
            raise SurgeonError(f"merge-checkpoint: the adapter's module '{path}' has no 2-D tensor '{name}' "
                               "in the checkpoint")
        layouts[path] = _layout(adapter, path, shapes[name])
    shown = {v for v in layouts.values() if v is not None}
    default = adapter.fan_in_fan_out if adapter.fan_in_fan_out is not None else (shown.pop() if len(shown) == 1
                                                                                  else False)
    plan = {}
    for path, transposed in layouts.items():
        plan[f"{path}.weight"] = Target(path, "weight", default if transposed is None else transposed)
        if adapter.kind.bias_scale is not None and f"{path}.bias" in shapes:
            plan[f"{path}.bias"] = Target(path, "bias")
    return plan


def _layout(adapter: Adapter, path: str, shape: list[int]) -> bool | None:
    """True for in x out storage, False for out x in, None when a square shape cannot tell."""
    rows, cols = shape
    if rows == cols:
        return None
    fits = [t for t, (out_f, in_f) in ((False, (rows, cols)), (True, (cols, rows)))
            if _shapes_fit(adapter, path, in_f, out_f)]
    if not fits:
        raise SurgeonError(f"merge-checkpoint: the adapter's weights for '{path}' do not fit its "
                           f"{rows}x{cols} checkpoint tensor in either layout")
    return fits[0]


def _shapes_fit(adapter: Adapter, path: str, in_f: int, out_f: int) -> bool:
    meta = torch.empty(out_f, in_f, device="meta")
    expected = adapter.kind.init(adapter.options[path], in_f, out_f, torch.float32,
                                 torch.Generator().manual_seed(0), meta)
    got = adapter.weights[path]
    shared = adapter.kind.shared   # shared tensors (VeRA's projections) may be sized for a larger layer
    return set(expected) == set(got) and all(
        tuple(got[p].shape) == tuple(t.shape) or (p in shared and all(g >= e for g, e in zip(got[p].shape, t.shape)))
        for p, t in expected.items())


# ---------------------------------------------------------------- merging and writing

def _add(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # the merge pass's rounding, (W.double() + dW.double()).to(W.dtype), with one float64 buffer
    total = weight.to(torch.float64, copy=True)
    total += delta
    return total.to(weight.dtype)


def merged_tensor(tensor: torch.Tensor, target: Target, adapter: Adapter) -> torch.Tensor:
    """The merged value of one checkpoint tensor (same dtype and shape)."""
    kind, params, options = adapter.kind, adapter.weights[target.path], adapter.options[target.path]
    if target.role == "bias":
        factor = kind.bias_scale(params, options)
        if factor is None:   # e.g. IA3 scaling a layer's input: the bias is left as it is
            return tensor
        return (tensor.double() * factor.double().reshape(tensor.shape)).to(tensor.dtype)
    weight = tensor.t() if target.transposed else tensor
    if kind.base_delta is not None:   # e.g. PiSSA: the base holds W - s B0 A0, as at insertion
        fresh = kind.init(options, weight.shape[1], weight.shape[0], weight.dtype,
                          torch.Generator().manual_seed(0), weight)
        base_delta = kind.base_delta(fresh, options, weight)
        weight = weight if base_delta is None else _add(weight, base_delta)
    merged = _add(weight, kind.delta_weight(params, options, weight))
    return (merged.t() if target.transposed else merged).contiguous()


def _write_shard(src: Path, dst: Path, header: tuple[dict, dict | None], plan: dict[str, Target],
                 adapter: Adapter, summary: MergeSummary) -> None:
    entries, metadata = header
    layout, offset = {}, 0
    for name, (dtype, shape) in sorted(entries.items()):
        if dtype not in DTYPE_BYTES:
            raise SurgeonError(f"merge-checkpoint: tensor '{name}' in '{src}' has unsupported dtype {dtype}")
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        layout[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        layout["__metadata__"] = metadata
    blob = json.dumps(layout, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the data starts 8-byte aligned
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(entries):
            with safe_open(str(src), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            if name in plan:
                tensor = merged_tensor(tensor, plan[name], adapter)
                summary.merged.append(name)
            else:
                summary.copied += 1
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            start, end = layout[name]["data_offsets"]
            if data.nbytes != end - start:
                raise SurgeonError(f"merge-checkpoint: tensor '{name}' came out {data.nbytes} bytes, expected "
                                   f"{end - start}")
            out.write(data.data)
            del tensor, data
            _release_freed_memory()
        summary.bytes_written += out.tell()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc serves blocks below its dynamic mmap threshold (up to 32 MiB) from the heap and keeps
    them after free; without a trim, fragmentation lets the resident size creep up by about a
    tensor per merged tensor instead of staying bounded.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None
