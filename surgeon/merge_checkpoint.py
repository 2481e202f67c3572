"""Merge an adapter into a safetensors checkpoint on disk, one tensor at a time.

`merge_checkpoint(base_dir, adapter_dir, out_dir)`: base_dir holds `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`;
adapter_dir is a surgeon adapter folder (save_adapter, or save_quantized_adapter) or a PEFT
LoRA folder. The merged weight of module P is `P.weight` + the kind's delta weight, computed
exactly as the merge pass does: the kind's dW, built once in float32 (float64 for a float64
weight: adapters.merge_dtype), is added to W in that dtype and the sum rounded to W's dtype by
adapters.merged_weight (one add, no float64 copy of W; bit for bit the earlier rule
(W.double() + dW.double()).to(W.dtype)), so the result equals an in-memory merge bit for bit.

Guarantees:
- memory: a merged tensor's bytes are read straight from its shard into one buffer (no mapping of
  a whole shard stays resident), merged, and written into the output file, whose header is
  computed up front from the input headers; an untouched tensor is copied file to file by the
  kernel (copy_file_range), never held in memory. Peak memory is a small multiple of the largest
  merged tensor (the tensor, the float32 delta, the result), never a shard;
- layout: the same shard files with the same tensor names, dtypes and shapes, the index file
  and every other top-level file copied byte for byte; untouched tensors are copied bit for bit;
- safety: inputs are only read; everything is written into a temporary sibling folder that is
  renamed to out_dir at the end and removed on any failure or SIGTERM, so out_dir is complete or
  absent; an existing out_dir is refused. The folder's name holds the host and PID of its run, so
  a later run removes one whose process was killed outright (SIGKILL) and keeps a live run's;
- hostile input: shard names from the index must be plain file names in base_dir, no symbolic
  link in base_dir is followed, and every file is created new (O_EXCL, O_NOFOLLOW) inside the
  private temporary folder; all of it is checked before anything is written;
- numbers: an adapter tensor holding NaN or Inf, or a merged tensor that is not finite where the
  base tensor is (an overflow of its dtype), is refused unless allow_nonfinite.

Weight layout: nn.Linear stores W as out x in, GPT-2's Conv1D as in x out. For non-square
weights the adapter's parameter shapes decide; square ones follow PEFT's `fan_in_fan_out`,
else the layout the adapter's non-square weights showed, else out x in.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .adapter_io import LoadedAdapter, _isfinite, _read_json, load_adapter_dir, load_peft_dir
from .adapters import AdapterKind, index_misfit, kinds, merged_weight
from .errors import SpecError, SurgeonError
from .pipeline import all_finite
from .spec import Spec, _check_option

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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
                     fan_in_fan_out: bool | None = None, allow_nonfinite: bool = False) -> MergeSummary:
    """Write base + adapter delta to out_dir, shard by shard and tensor by tensor."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if os.path.lexists(out_dir):
        what = "is a symbolic link" if out_dir.is_symlink() else "exists"
        raise SurgeonError(f"merge-checkpoint: output folder '{out_dir}' {what}; refusing to overwrite it")
    shards = _shard_files(base_dir)
    others = _other_files(base_dir, shards)
    headers = {shard: _read_header(base_dir / shard) for shard in shards}
    adapter = read_adapter(Path(adapter_dir), allow_nonfinite)
    if fan_in_fan_out is not None:
        adapter.fan_in_fan_out = fan_in_fan_out
    plan = plan_targets(adapter, {name: shape for h in headers.values() for name, (_, shape) in h[0].items()})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    summary = MergeSummary(out_dir, shards)
    with _sigterm_unwinds():
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.{_run_tag()}.", suffix=".tmp"))
        try:
            for shard in shards:
                _write_shard(base_dir / shard, tmp / shard, headers[shard], plan, adapter, summary, allow_nonfinite)
            for name in others:
                _copy_file(base_dir / name, tmp / name)
            os.chmod(tmp, 0o755)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return summary


# ---------------------------------------------------------------- reading

def _shard_files(base_dir: Path) -> list[str]:
    index_path = base_dir / INDEX
    if _regular_file(index_path):
        weight_map = _read_index(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SurgeonError(f"merge-checkpoint: '{index_path}' has no weight_map")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise SurgeonError(f"merge-checkpoint: '{index_path}' names shard {shard!r} for tensor '{tensor}'; "
                                   "a shard is a file name")
            if shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
                raise SurgeonError(f"merge-checkpoint: shard {shard!r} named by '{index_path}' is not a plain file "
                                   "name in the base folder; fix the index (merge-checkpoint reads and writes "
                                   "nothing outside its folders)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not _regular_file(base_dir / s)]
        if missing:
            raise SurgeonError(f"merge-checkpoint: shards {missing} named by '{index_path}' are missing")
        return shards
    if _regular_file(base_dir / SINGLE):
        return [SINGLE]
    raise SurgeonError(f"merge-checkpoint: '{base_dir}' has neither {INDEX} nor {SINGLE}")


def _regular_file(path: Path) -> bool:
    """Whether path is a file; a symbolic link in the base folder is refused, never followed."""
    if path.is_symlink():
        raise SurgeonError(f"merge-checkpoint: '{path}' is a symbolic link; merge-checkpoint follows no link in "
                           "the base folder (put the file itself there)")
    return path.is_file()


def _other_files(base_dir: Path, shards: list[str]) -> list[str]:
    """The top-level files besides the shards (config, tokenizer, the index), copied as they are."""
    return [p.name for p in sorted(base_dir.iterdir()) if _regular_file(p) and p.name not in shards]


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise SurgeonError(f"merge-checkpoint: '{path}' is not valid JSON: {error}") from error
    if not isinstance(index, dict):
        raise SurgeonError(f"merge-checkpoint: '{path}' must hold a JSON object, got {type(index).__name__}")
    return index


def _read_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict | None]:
    """(tensor name -> (safetensors dtype, shape)) and the file's metadata, without reading data."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            entries = {}
            for name in handle.keys():
                view = handle.get_slice(name)
                entries[name] = (view.get_dtype(), list(view.get_shape()))
            metadata = handle.metadata()
    except (SafetensorError, OSError, ValueError) as error:
        raise SurgeonError(f"merge-checkpoint: '{path}' is not a readable safetensors file: {error}") from error
    for name, (dtype, _) in entries.items():
        if dtype not in DTYPE_BYTES:
            raise SurgeonError(f"merge-checkpoint: tensor '{name}' in '{path}' has unsupported dtype {dtype}")
    return entries, metadata


def read_adapter(adapter_dir: Path, allow_nonfinite: bool = False) -> Adapter:
    """A surgeon (plain or quantized) or PEFT adapter folder, with checked per-module options."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise SurgeonError(f"merge-checkpoint: '{config_path}' is missing")
    config = _read_json(config_path)
    flag = None
    if "peft_type" in config:
        loaded = load_peft_dir(adapter_dir, allow_nonfinite)
        flag = bool(config.get("fan_in_fan_out", False))
    elif isinstance(config.get("quantized"), dict):
        from .quantized_io import load_quantized_adapter

        loaded = load_quantized_adapter(adapter_dir, allow_nonfinite)
    else:
        loaded = load_adapter_dir(adapter_dir, allow_nonfinite)
    kind = kinds().get(loaded.entry["type"])
    if kind is None:
        raise SpecError("type", f"'{config_path}': unknown adapter type {loaded.entry['type']!r}; "
                                f"known: {sorted(kinds())}")
    options = _site_options(kind, loaded, str(config_path))
    # whether a layer has a bias (a kind's `biased` site option, e.g. LoRA's lora_bias) is read from the
    # checkpoint's tensors when planning (plan_targets); until then it is taken as present
    reason = next((r for o in options.values() if (r := kind.refusal(_bias_assumed(kind, o)))), "")
    if reason:
        raise SurgeonError(f"merge-checkpoint: a {kind.name} adapter cannot be merged: {reason}")
    return Adapter(kind, loaded.weights, options, flag)


def _site_options(kind: AdapterKind, loaded: LoadedAdapter, source: str) -> dict[str, dict]:
    """Per-module options, each checked as a spec checks it (type, positive, choices)."""
    shell = Spec((), (), source=source)
    base = {key: _check_option(shell, ("options", key), loaded.entry.get(key, option.default), option)
            for key, option in kind.options.items()}
    sites = {}
    for path in loaded.weights:
        own = loaded.site_options.get(path, {})
        sites[path] = {**base, **{key: _check_option(shell, ("site_options", path, key), value, kind.options[key])
                                  if key in kind.options else value for key, value in own.items()}}
    return sites


def _bias_assumed(kind: AdapterKind, options: dict) -> dict:
    return {**options, "biased": True} if "biased" in kind.options and options.get("biased") is None else options


def plan_targets(adapter: Adapter, shapes: dict[str, list[int]]) -> dict[str, Target]:
    """Checkpoint tensor name -> how to rewrite it; every adapter module must be found."""
    if "biased" in adapter.kind.options:   # now known: whether each layer has a bias in the checkpoint
        for path, options in adapter.options.items():
            if options.get("biased") is None:
                options["biased"] = f"{path}.bias" in shapes
            reason = adapter.kind.refusal(options)
            if reason:
                raise SurgeonError(f"merge-checkpoint: a {adapter.kind.name} adapter cannot be merged at '{path}': "
                                   f"{reason}")
    layouts: dict[str, bool | None] = {}
    for path in adapter.weights:
        name = f"{path}.weight"
        if name not in shapes or len(shapes[name]) != 2:
            raise SurgeonError(f"merge-checkpoint: the adapter's module '{path}' has no 2-D tensor '{name}' "
                               "in the checkpoint")
        layouts[path] = _layout(adapter, path, name, shapes[name])
    shown = {v for v in layouts.values() if v is not None}
    default = adapter.fan_in_fan_out if adapter.fan_in_fan_out is not None else (shown.pop() if len(shown) == 1
                                                                                  else False)
    plan = {}
    for path, transposed in layouts.items():
        plan[f"{path}.weight"] = Target(path, "weight", default if transposed is None else transposed)
        if adapter.kind.bias_map is not None and f"{path}.bias" in shapes:
            plan[f"{path}.bias"] = Target(path, "bias")
    return plan


def _layout(adapter: Adapter, path: str, name: str, shape: list[int]) -> bool | None:
    """True for in x out storage, False for out x in, None when a square shape cannot tell.

    The adapter's tensors must have the shapes its options (rank, ...) give the layer in one layout."""
    rows, cols = shape
    misfit = _misfit(adapter, path, cols, rows)                              # stored out x in
    if misfit is None:
        return None if rows == cols else False
    if rows != cols and _misfit(adapter, path, rows, cols) is None:          # stored in x out
        return True
    raise SpecError("<adapter>", f"the adapter's weights for '{path}' do not fit the checkpoint's {rows}x{cols} "
                                 f"tensor '{name}'{'' if rows == cols else ' in either layout'}: {misfit}")


def _misfit(adapter: Adapter, path: str, in_f: int, out_f: int) -> str | None:
    """None when the adapter's tensors for `path` have the shapes its options give an in_f -> out_f
    layer, else what differs."""
    options = adapter.options[path]
    meta = torch.empty(out_f, in_f, device="meta")
    try:
        expected = adapter.kind.init(options, in_f, out_f, torch.float32, torch.Generator().manual_seed(0), meta)
    except ValueError as error:   # options that cannot fit this layer at all (e.g. OFT's block size)
        return str(error)
    got = adapter.weights[path]
    expected = {p: t for p, t in expected.items() if p in got or p not in adapter.kind.recomputed}
    if set(expected) != set(got):
        return f"module '{path}' has tensors {sorted(got)}, a {adapter.kind.name} adapter has {sorted(expected)}"
    shared = adapter.kind.shared   # shared tensors (VeRA's projections) may be sized for a larger layer
    for p, t in expected.items():
        g = got[p]
        if tuple(g.shape) != tuple(t.shape) and not (p in shared and g.dim() == t.dim() and all(
                a >= b for a, b in zip(g.shape, t.shape))):
            given = ", ".join(f"{k}={v!r}" for k, v in options.items())
            return f"{p} of module '{path}' has shape {list(g.shape)}, but its options ({given}) need {list(t.shape)}"
    misfit = index_misfit(adapter.kind, options, in_f, out_f, got)
    return f"module '{path}': {misfit}" if misfit else None


# ---------------------------------------------------------------- merging and writing

def merged_tensor(tensor: torch.Tensor, target: Target, adapter: Adapter) -> torch.Tensor:
    """The merged value of one checkpoint tensor (same dtype and shape, contiguous)."""
    kind, params, options = adapter.kind, adapter.weights[target.path], adapter.options[target.path]
    if target.role == "bias":
        new = kind.bias_map(params, options, tensor.double(), False)
        if new is None:   # e.g. IA3 scaling a layer's input: the bias is left as it is
            return tensor
        return new.reshape(tensor.shape).to(tensor.dtype)
    weight = tensor.t() if target.transposed else tensor
    if kind.base_delta is not None:   # e.g. PiSSA: the base holds W - s B0 A0, as at insertion
        fresh = kind.init(options, weight.shape[1], weight.shape[0], weight.dtype,
                          torch.Generator().manual_seed(0), weight)
        base_delta = kind.base_delta(fresh, options, weight)
        weight = weight if base_delta is None else merged_weight(weight, base_delta)
    if kind.recomputed - set(params):   # PEFT saves no PSOFT A, B: rebuilt from the weight, as insert does
        fresh = kind.init(options, weight.shape[1], weight.shape[0], weight.dtype,
                          torch.Generator().manual_seed(0), weight)
        params = {**{p: fresh[p] for p in kind.recomputed if p in fresh}, **params}
    delta = kind.delta_weight(params, options, weight)
    if target.transposed:   # rounded in the stored in x out layout, as the merge pass rounds a Conv1D weight
        return merged_weight(weight.t(), delta.t())
    return merged_weight(weight, delta)


def _write_shard(src: Path, dst: Path, header: tuple[dict, dict | None], plan: dict[str, Target],
                 adapter: Adapter, summary: MergeSummary, allow_nonfinite: bool = False) -> None:
    entries, metadata = header
    layout, offset = {}, 0
    for name, (dtype, shape) in sorted(entries.items()):
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        layout[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        layout["__metadata__"] = metadata
    blob = json.dumps(layout, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the data starts 8-byte aligned
    source = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        where = _data_offsets(source, src, entries)
        out = _create_fd(dst)
        try:
            written = _write_all(out, struct.pack("<Q", len(blob)) + blob)
            for name in sorted(entries):
                start, end = where[name]
                if name not in plan:
                    written += _copy_range(source, out, start, end - start, src)
                    summary.copied += 1
                    continue
                tensor = _read_tensor(source, src, name, start, *entries[name])
                merged = merged_tensor(tensor, plan[name], adapter)
                if not allow_nonfinite:
                    _check_finite(name, src, tensor, merged)
                summary.merged.append(name)
                data = merged.contiguous().reshape(-1).view(torch.uint8).numpy()
                first, last = layout[name]["data_offsets"]
                if data.nbytes != last - first:
                    raise SurgeonError(f"merge-checkpoint: tensor '{name}' came out {data.nbytes} bytes, expected "
                                       f"{last - first}")
                written += _write_all(out, data)
                del tensor, merged, data
                _release_freed_memory()
        finally:
            os.close(out)
        summary.bytes_written += written
    finally:
        os.close(source)


def _data_offsets(fd: int, path: Path, entries: dict) -> dict[str, tuple[int, int]]:
    """Tensor name -> (first, last) byte of its data in the file, from the file's own header, each
    checked against the dtype and shape _read_header found and against the file's size."""
    size = os.fstat(fd).st_size
    head = _pread(fd, 8, 0)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    what = f"merge-checkpoint: '{path}' is not a readable safetensors file"
    if not 0 < length <= size - 8:
        raise SurgeonError(f"{what}: header length {length} in a {size}-byte file")
    try:
        table = json.loads(_pread(fd, length, 8))
    except (ValueError, RecursionError) as error:
        raise SurgeonError(f"{what}: {error}") from error
    where = {}
    for name, (dtype, shape) in entries.items():
        info = table.get(name) if isinstance(table, dict) else None
        span = info.get("data_offsets") if isinstance(info, dict) else None
        first, last = span if isinstance(span, list) and len(span) == 2 else (None, None)
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last
                and last - first == math.prod(shape) * DTYPE_BYTES[dtype] and 8 + length + last <= size):
            raise SurgeonError(f"{what}: tensor '{name}' has data offsets {span!r}, which do not fit its "
                               f"{dtype}{shape} in the file")
        where[name] = (8 + length + first, 8 + length + last)
    return where


def _pread(fd: int, count: int, offset: int) -> bytes:
    parts = []
    while count:
        part = os.pread(fd, min(count, 1 << 30), offset)
        if not part:
            break
        parts.append(part)
        count -= len(part)
        offset += len(part)
    return b"".join(parts)


def _read_tensor(fd: int, path: Path, name: str, offset: int, dtype: str, shape: list[int]) -> torch.Tensor:
    """One tensor's data read from the shard into a new tensor (safetensors stores little-endian)."""
    if dtype not in FLOAT_DTYPES or sys.byteorder != "little":
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    tensor = torch.empty(shape, dtype=FLOAT_DTYPES[dtype])
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise SurgeonError(f"merge-checkpoint: '{path}' ended inside tensor '{name}'")
        done += got
    return tensor


def _write_all(fd: int, data) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def _copy_range(source: int, out: int, offset: int, count: int, path: Path) -> int:
    """count bytes of source from offset onto out's end: file to file in the kernel (copy_file_range),
    or through a 1 MiB buffer where the kernel or file system cannot."""
    done = 0
    kernel = getattr(os, "copy_file_range", None)
    while done < count:
        got = 0
        if kernel is not None:
            try:
                got = kernel(source, out, count - done, offset + done)
            except OSError:   # not between these files (another file system, an old kernel): copy by hand
                kernel = None
                continue
        else:
            part = os.pread(source, min(count - done, 1 << 20), offset + done)
            got = len(part) and _write_all(out, part)
        if got <= 0:
            raise SurgeonError(f"merge-checkpoint: '{path}' ended {count - done} bytes early")
        done += got
    return done


def _check_finite(name: str, src: Path, base: torch.Tensor, merged: torch.Tensor) -> None:
    """A merged tensor may be NaN or Inf only where the base tensor already is."""
    if not merged.is_floating_point() or all_finite(merged) or not (bad := ~_isfinite(merged)).any():
        return
    count = int((bad & _isfinite(base)).sum())
    if count:
        raise SurgeonError(f"merge-checkpoint: merged tensor '{name}' (in '{src}') is not finite in {count} "
                           f"places where the base tensor is: the adapter's delta overflows {merged.dtype} or is NaN; "
                           "check the adapter, or write it anyway with allow_nonfinite=True")


def _create_fd(path: Path) -> int:
    """A new file for writing: never an existing one, never through a symbolic link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)


def _create(path: Path):
    return os.fdopen(_create_fd(path), "wb")


def _copy_file(src: Path, dst: Path) -> None:
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as source, _create(dst) as out:
        shutil.copyfileobj(source, out)


# ---------------------------------------------------------------- temporary folders and SIGTERM

def _run_tag() -> str:
    """'<host>-<pid>': names this run in its temporary folder's name."""
    return f"{re.sub(r'[^A-Za-z0-9]', '', socket.gethostname())[:40]}-{os.getpid()}"


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove the temporary folders for out_dir that runs on this host left when they were killed
    (SIGKILL, power loss); a folder whose process is alive belongs to a concurrent run and stays."""
    host = _run_tag().rpartition("-")[0]
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.{re.escape(host)}-(\d+)\.[a-z0-9_]+\.tmp")
    for entry in out_dir.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not entry.is_symlink() and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):   # not ours to signal (alive), or no such number: keep its folder
        return True
    return True


class _Terminated(BaseException):
    """SIGTERM arrived while writing: unwinds the write so the temporary folder is removed."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While writing, SIGTERM raises _Terminated (the write's cleanup removes its temporary folder);
    then the previous handler is restored and the signal delivered again, so the process ends as
    SIGTERM would have ended it. Only in the main thread, and only where SIGTERM is not ignored."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous in (None, signal.SIG_IGN):
        yield
        return
    received = []

    def unwind(signum, frame):
        if not received:   # a second SIGTERM lets the cleanup finish
            received.append(signum)
            raise _Terminated()
    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise SurgeonError("merge-checkpoint: stopped by SIGTERM; nothing was written") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


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
