"""Packed low-bit adapter tensors: quantize, bit-pack, dequantize, and their safetensors format.

A tensor is flattened row-major and cut into groups of `group_size` entries (the last group
zero-padded); each entry becomes a `bits`-wide code, `8 // bits` codes per byte, lowest bits
first; each group keeps a float32 scale (and, for affine, a float32 minimum). Methods:

- sign (1 bit): code = [w >= 0], value = (2 code - 1) * s, s = mean |w| over the group.
  For a fixed sign vector z (z_i = +-1, w_i z_i = |w_i|): ||w - s z||^2 = sum w_i^2
  - 2 s sum |w_i| + G s^2, minimized at s = sum |w_i| / G = mean |w|.
- ternary (ComPEFT-style, 2-bit codes): keep the top `density` fraction of the tensor's
  entries by magnitude, code = sign(w) + 1 (0 for dropped), value = (code - 1) * s, with
  s = mean |w| over the group's kept entries (the least-squares scale for that support and
  those signs, by the same identity restricted to the kept entries).
- affine (2/4/8 bits, asymmetric): s = (max - min) / (2^b - 1), code = round((w - min) / s),
  value = code * s + min; all 2^b levels are used and the group's range is covered.

`dequantize_with` is the one definition of decoding: the quantize-adapters pass calls it with
a graph-node builder and `dequantize` with eager aten calls, so the graph and the loader
decode bit for bit alike. On disk (`save_quantized_adapter`): adapter.safetensors holds only
the packed codes, scales and minima (plus any float parameter left unquantized), and
adapter_config.json the kind, options and each tensor's format; writes are atomic.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .adapter_io import FORMAT_VERSION, LoadedAdapter, _read_json, _read_tensors, _unshared, _write_atomic
from .errors import SpecError
from .graph import get_tensor

aten = torch.ops.aten
METHOD_BITS = {"sign": (1,), "ternary": (2,), "affine": (2, 4, 8)}
PARTS = ("packed", "scales", "minimum")


@dataclass(frozen=True)
class QuantFormat:
    bits: int
    group_size: int
    method: str
    shape: tuple[int, ...]
    dtype: str          # the original dtype, e.g. "float32"

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def groups(self) -> int:
        return -(-self.numel // self.group_size)

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> "QuantFormat":
        return cls(int(data["bits"]), int(data["group_size"]), str(data["method"]), tuple(data["shape"]),
                   str(data["dtype"]))


@dataclass(frozen=True)
class QuantizedTensor:
    format: QuantFormat
    packed: torch.Tensor              # uint8 [groups * group_size * bits / 8]
    scales: torch.Tensor              # float32 [groups]
    minimum: torch.Tensor | None      # float32 [groups], affine only

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name (packed, scales, and minimum for affine)."""
        found = {"packed": self.packed, "scales": self.scales, "minimum": self.minimum}
        return {k: v for k, v in found.items() if v is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())


# ---------------------------------------------------------------- quantize and pack

def quantize(tensor: torch.Tensor, bits: int, group_size: int, method: str,
             density: float = 0.1) -> QuantizedTensor:
    """Quantize `tensor` per group of `group_size` flattened entries (see the module docstring)."""
    if bits not in METHOD_BITS.get(method, ()) or group_size % 8 or group_size <= 0:
        raise ValueError(f"unsupported quantization: {bits}-bit {method}, group_size {group_size}")
    fmt = QuantFormat(bits, group_size, method, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    flat = tensor.detach().float().flatten()
    padded = F.pad(flat, (0, fmt.groups * group_size - fmt.numel)).view(fmt.groups, group_size)
    valid = (torch.arange(fmt.groups * group_size, device=flat.device) < fmt.numel).view_as(padded)
    minimum = None
    if method == "sign":
        codes, scales = _sign(padded, valid)
    elif method == "ternary":
        codes, scales = _ternary(padded, valid, density)
    else:
        codes, scales, minimum = _affine(padded, valid, bits)
    codes = torch.where(valid, codes, torch.zeros_like(codes))
    return QuantizedTensor(fmt, pack(codes.flatten(), bits), scales, minimum)


def _sign(groups: torch.Tensor, valid: torch.Tensor):
    # the error-minimizing scale of sign quantization is the group's mean |w| (module docstring)
    scales = (groups.abs() * valid).sum(1) / valid.sum(1)
    return (groups >= 0).to(torch.uint8), scales


def _ternary(groups: torch.Tensor, valid: torch.Tensor, density: float):
    magnitude = groups.abs() * valid
    count = int(valid.sum())
    keep_count = max(0, min(count, int(density * count + 1e-9)))
    flat = magnitude.flatten()   # the keep_count-th largest magnitude (padding counts as 0)
    threshold = flat.kthvalue(flat.numel() - keep_count + 1).values if keep_count else float("inf")
    kept = (magnitude >= threshold) & (magnitude > 0) & valid
    # least-squares scale over the kept entries: mean |w| there
    scales = (magnitude * kept).sum(1) / kept.sum(1).clamp_min(1)
    codes = torch.where(kept, torch.sign(groups) + 1, torch.ones_like(groups))
    return codes.to(torch.uint8), scales


def _affine(groups: torch.Tensor, valid: torch.Tensor, bits: int):
    levels = (1 << bits) - 1
    low = torch.where(valid, groups, torch.full_like(groups, float("inf"))).amin(1)
    high = torch.where(valid, groups, torch.full_like(groups, float("-inf"))).amax(1)
    scales = (high - low) / levels
    step = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - low[:, None]) / step[:, None]).clamp(0, levels)
    return codes.to(torch.uint8), scales, low


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2^bits, length a multiple of 8 // bits) into bytes, lowest bits first."""
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    # the shifted codes occupy disjoint bit fields, so their sum is their bitwise or
    return (codes.view(-1, per_byte) << shifts).sum(-1).to(torch.uint8)


# ---------------------------------------------------------------- decode (graph or eager)

def dequantize_with(op: Callable, packed: Any, scales: Any, minimum: Any, fmt: QuantFormat,
                    device: torch.device) -> Any:
    """Decode through `op(target, *args, **kwargs)`: graph nodes (Branch.op) or eager aten calls."""
    codes = packed
    if fmt.bits < 8:   # byte >> (bits * k) & (2^bits - 1) is code k of that byte
        shifts = op(aten.arange.start_step, 0, 8, fmt.bits, dtype=torch.uint8, device=device)
        codes = op(aten.bitwise_right_shift.Tensor, op(aten.unsqueeze.default, packed, -1), shifts)
        codes = op(aten.bitwise_and.Scalar, codes, (1 << fmt.bits) - 1)
    codes = op(aten.view.default, codes, [fmt.groups, fmt.group_size])
    values = op(aten._to_copy.default, codes, dtype=torch.float32)
    scale = op(aten.unsqueeze.default, scales, -1)
    if fmt.method == "sign":      # (2c - 1) s
        values = op(aten.mul.Tensor, op(aten.sub.Tensor, op(aten.mul.Tensor, values, 2), 1), scale)
    elif fmt.method == "ternary":  # (c - 1) s
        values = op(aten.mul.Tensor, op(aten.sub.Tensor, values, 1), scale)
    else:                          # c s + min
        values = op(aten.add.Tensor, op(aten.mul.Tensor, values, scale),
                    op(aten.unsqueeze.default, minimum, -1))
    if fmt.groups * fmt.group_size != fmt.numel:   # drop the last group's padding
        values = op(aten.slice.Tensor, op(aten.view.default, values, [-1]), 0, 0, fmt.numel)
    values = op(aten.view.default, values, list(fmt.shape))
    if fmt.dtype != "float32":
        values = op(aten._to_copy.default, values, dtype=getattr(torch, fmt.dtype))
    return values


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The decoded tensor, computed by the same ops the graph runs."""
    return dequantize_with(lambda target, *a, **k: target(*a, **k), q.packed, q.scales, q.minimum, q.format,
                           q.packed.device)


# ---------------------------------------------------------------- files

def save_quantized_adapter(compiled, name: str, directory: str | Path) -> None:
    """Write a quantized adapter: packed codes + scales in adapter.safetensors, formats in JSON."""
    state = compiled._state(name)
    if state.status != "quantized":
        raise SpecError(f"adapters.{name}", f"is {state.status}, not quantized; run quantize-adapters first "
                                            "or use save_adapter")
    flat, formats, site_options = {}, {}, {}
    for site in state.sites:
        quantized = site.options.get("quantized", {})
        formats[site.path] = quantized
        for key, target in site.params.items():
            pname, _, part = key.rpartition("_")
            stored = f"{pname}.{part}" if pname in quantized and part in PARTS else key
            flat[f"{site.path}.{stored}"] = get_tensor(compiled.module, target).detach().contiguous().cpu()
        extra = {k: v for k, v in site.options.items() if k != "quantized" and v != state.spec.options.get(k)}
        if extra:
            site_options[site.path] = extra
    config = {"surgeon_adapter": FORMAT_VERSION, "quantized": formats, "name": name, "type": state.spec.type,
              "options": state.spec.options, "targets": sorted(formats), "site_options": site_options}
    from safetensors.torch import save_file

    directory = Path(directory)
    flat = _unshared(flat)   # a float tensor several sites share (VeRA's projections, VB-LoRA's bank): a copy each
    _write_atomic(directory / "adapter.safetensors", lambda tmp: save_file(flat, tmp))
    _write_atomic(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


def read_quantized_adapter(directory: str | Path,
                           allow_nonfinite: bool = False) -> tuple[dict, dict[str, dict[str, Any]]]:
    """(config, module path -> param name -> QuantizedTensor, or a float tensor kept as it was)."""
    directory = Path(directory)
    config = _read_json(directory / "adapter_config.json")
    if config.get("surgeon_adapter") != FORMAT_VERSION or not isinstance(config.get("quantized"), dict):
        raise SpecError("<adapter>", f"'{directory}' is not a quantized surgeon adapter")
    flat = _read_tensors(directory / "adapter.safetensors", allow_nonfinite)
    out: dict[str, dict[str, Any]] = {}
    for path, formats in config["quantized"].items():
        site = out.setdefault(path, {})
        for pname, fmt in formats.items():
            parts = {part: flat.pop(f"{path}.{pname}.{part}", None) for part in PARTS}
            if parts["packed"] is None or parts["scales"] is None:
                raise SpecError("<adapter>", f"'{directory}': '{path}.{pname}' lacks its packed codes or scales")
            site[pname] = QuantizedTensor(QuantFormat.from_json(fmt), parts["packed"], parts["scales"],
                                          parts["minimum"])
    for key, tensor in flat.items():
        path, _, pname = key.rpartition(".")
        if path not in out:
            raise SpecError("<adapter>", f"'{directory}': tensor '{key}' belongs to no listed module")
        out[path][pname] = tensor
    return config, out


def load_quantized_adapter(directory: str | Path, allow_nonfinite: bool = False) -> LoadedAdapter:
    """Read a quantized adapter folder, decoded to the kind's float parameters (insertable as from_dir)."""
    config, tensors = read_quantized_adapter(directory, allow_nonfinite)
    weights = {path: {p: dequantize(t) if isinstance(t, QuantizedTensor) else t for p, t in params.items()}
               for path, params in tensors.items()}
    entry = {"type": config["type"], "targets": list(config["targets"]), **config.get("options", {})}
    return LoadedAdapter(entry, weights, config.get("site_options", {}))
