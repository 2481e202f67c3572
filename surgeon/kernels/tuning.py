"""Measured choices per shape bucket, kept in memory and on disk across processes.

A launcher names its candidates (tile configs, strategies) and how to time one; `fastest`
times each once per bucket (a candidate that fails to launch, e.g. too much shared memory, is
skipped), keeps the fastest in the caller's table, and writes it to a JSON file so that the
next process on the same GPU, torch and Triton starts without retuning:

    $SURGEON_TUNE_CACHE, else tuning.json in the generated-kernel folder (kernels/codegen.py)

Entries are keyed by the device's name, the torch and Triton versions, the op and the bucket;
a stored choice is used only when it is still one of the caller's candidates.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from . import codegen
from ..errors import KernelError

_log = logging.getLogger(__name__)


def fastest(table: dict, op: str, bucket: tuple, candidates: list, time_one: Callable[[Any], float],
            check: Callable[[Any], bool] | None = None, unmeasurable: Callable[[], str] | None = None) -> Any:
    """The candidate that ran fastest for `bucket` (measured here once, or read from the disk cache).

    With `check`, a candidate is timed only when check(candidate) holds (e.g. its output agrees with
    a reference): one that computes something else is skipped like one that fails to launch.
    `unmeasurable()` (e.g. `capture_reason`), asked only when a choice must be measured, says why
    nothing can be run now ("" when it can): a choice in the table or on disk is still returned;
    otherwise KernelError says so.
    """
    if bucket in table:
        return table[bucket]
    key = _key(op, bucket)
    stored = _load().get(key)
    found = next((c for c in candidates if _json(c) == stored), None) if stored is not None else None
    why = unmeasurable() if found is None and unmeasurable is not None else ""
    if why:
        raise KernelError(f"{op}: no tuned choice for {bucket!r}, and {why}")
    if found is None:
        timings = {}
        for candidate in candidates:
            try:
                if check is not None and not check(candidate):
                    _log.warning("%s: candidate %r disagrees with the reference for %r; skipped", op, candidate, bucket)
                    continue
                timings[candidate] = time_one(candidate)
            except Exception:  # noqa: BLE001 - a candidate may not launch on this device; try the next
                continue
        if not timings:
            raise KernelError(f"{op}: no candidate launches on this device for {bucket}")
        found = min(timings, key=timings.get)
        _store(key, _json(found))
    table[bucket] = found
    return found


def capture_reason(x: torch.Tensor) -> str:
    """Why candidates cannot be timed now ("" when they can): a CUDA graph is being captured on the
    current stream (a launch there is recorded, not run, and timing it synchronizes)."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return ("this call runs inside a CUDA graph capture, where candidates cannot be run or timed: "
                "call the module once with the same shapes before capturing (a warm-up, as "
                "torch.compile's reduce-overhead mode does)")
    return ""


def agrees(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a tuning candidate's output is the torch reference's up to rounding: within 5% of the
    output's largest magnitude (16-bit and tf32 rounding differ by far less; a split-K slice lost to
    a race, or a wrong tile, by far more)."""
    scale = expected.float().abs().max().item()
    return bool(torch.isfinite(out).all()) and (out.float() - expected.float()).abs().max().item() <= 0.05 * scale


def cache_path() -> Path:
    """The disk cache's file."""
    return Path(os.environ.get("SURGEON_TUNE_CACHE") or codegen.cache_dir() / "tuning.json")


def _key(op: str, bucket: tuple) -> str:
    import torch
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{device} | torch {torch.__version__} | triton {triton.__version__} | {op} | {bucket!r}"


def _json(value: Any) -> str:
    return json.dumps(value)       # tuples and lists alike: a choice read back compares equal


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):    # no file yet, or an unreadable one: tune again
        return {}


def _store(key: str, value: str) -> None:
    path = cache_path()
    entries = {**_load(), key: value}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(entries, indent=1))
        partial.replace(path)        # atomic: a concurrent reader sees the old file or the new one
    except OSError:                  # a read-only cache folder costs a retune next time, nothing else
        pass
