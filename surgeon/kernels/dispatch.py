"""Which implementation a surgeon custom op runs, decided per call from its inputs.

  "triton"              CUDA tensors and Triton importable: the generated kernel;
  "triton-interpreter"  TRITON_INTERPRET=1: the generated kernel on the CPU, through Triton's
                        interpreter (slow; for tests);
  "reference"           otherwise (no GPU), or a dtype no kernel takes (fp64): the torch
                        reference math; a warning says so once per op, device and dtypes.
"""
from __future__ import annotations

import contextlib
import logging
from functools import lru_cache

import torch

from . import codegen

log = logging.getLogger("surgeon.kernels")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports here."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no Triton path
        return False
    return True


def backend(device: torch.device | str) -> str:
    """Which implementation a call with tensors on `device` runs (see the module docstring)."""
    device = torch.device(device)
    if not triton_available():
        return "reference"
    if codegen.interpreting():
        return "triton-interpreter" if device.type == "cpu" else "reference"
    return "triton" if device.type == "cuda" else "reference"


def on_device(device: torch.device):
    """A context that makes `device` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_WARNED: set[tuple] = set()


def runs_kernel(op: str, device: torch.device, dtypes: set[torch.dtype]) -> bool:
    """Whether a call of `op` runs its generated kernel; when not, warn once that it runs the reference."""
    if dtypes <= set(KERNEL_DTYPES) and backend(device) != "reference":
        return True
    key = (op, device.type, tuple(sorted(map(str, dtypes))))
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("surgeon::%s on %s (%s) runs the torch reference path, not a Triton kernel",
                    op, device.type, ", ".join(key[2]))
    return False


def planned(table: dict, key, make, limit: int):
    """table[key], made by make() on a miss (a make() that raises leaves nothing); the table is
    emptied when it holds `limit` entries (shapes that keep changing must not grow it forever)."""
    plan = table.get(key)
    if plan is None:
        plan = make()
        if len(table) >= limit:
            table.clear()
        table[key] = plan
    return plan


# split-K workspaces per (device, stream): fp32 partial-sum slots, rewritten by every launch, and
# arrival counters, zero between launches (the last program of each tile resets its own)
SPLIT_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_workspace(device: torch.device, slots: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace of at least `slots` values, int32 counters for at least `tiles` tiles, all zero)
    for a split-K launch on the current stream of `device`; grown as needed, reused otherwise."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # inside a CUDA graph capture: buffers of the graph's own (the counters' zeroing is captured too)
        return (torch.empty(slots, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    have = SPLIT_WORKSPACES.get(key)
    if have is None or have[0].numel() < slots or have[1].numel() < tiles:
        slots, tiles = (slots, tiles) if have is None else (max(slots, have[0].numel()), max(tiles, have[1].numel()))
        have = SPLIT_WORKSPACES[key] = (torch.empty(slots, dtype=torch.float32, device=device),
                                        torch.zeros(tiles, dtype=torch.int32, device=device))
    return have
