"""Per-call routing inputs: the task id of each row, read by adapters that route by task (Poly / MHR).

PEFT's Poly takes `model(input_ids, task_ids=...)` and `model.generate(..., task_ids=...)`: one task id
per row. The compiled module takes the same keyword (surgeon.module): the call holds the ids in a context
variable for its duration, and a routed site's run-time helper (surgeon.adapters.poly) reads them, so no
graph gains an input and the generation graphs need nothing of their own. A generate that runs a subset
of the rows at a time (the recompute path's rows of one length) narrows the ids with `rows`.

surgeon's own numeric checks (a pass's before / after comparison, the generator's check of its KV-cache
graphs) run the graphs on the compile's examples, which carry no task ids: inside `checking()` every row
reads task 0, the same on both sides of a comparison.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

import torch

from .errors import InputError

# (the ids, their largest on the host or -1): read once per call, so the sites need no device sync each
_TASKS: ContextVar[tuple[torch.Tensor, int] | None] = ContextVar("surgeon_task_ids", default=None)
_CHECKING: ContextVar[bool] = ContextVar("surgeon_task_checking", default=False)


def as_task_ids(task_ids: Any) -> torch.Tensor:
    """A call's `task_ids` as a 1-D int64 tensor (a list, a tensor of any integer dtype, or one int)."""
    try:
        ids = torch.as_tensor(task_ids)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"task_ids must be integers, one per row (PEFT's Poly convention), got "
                         f"{task_ids!r}"[:300]) from error
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex() or ids.dim() > 1:
        raise InputError(f"task_ids must be a 1-D tensor or list of integers, one per row, got "
                         f"{ids.dtype} of shape {list(ids.shape)}")
    ids = ids.reshape(-1).long()
    if ids.numel() and int(ids.min()) < 0:
        raise InputError(f"task_ids must be non-negative, got {int(ids.min())}")
    return ids


@contextlib.contextmanager
def given(task_ids: Any) -> Iterator[None]:
    """The block's calls run with these task ids (None: none given)."""
    token = _TASKS.set(None if task_ids is None else _held(as_task_ids(task_ids)))
    try:
        yield
    finally:
        _TASKS.reset(token)


@contextlib.contextmanager
def rows(index: torch.Tensor) -> Iterator[None]:
    """Narrow the task ids in effect to these rows for the block (nothing when no ids are given)."""
    current = _TASKS.get()
    token = _TASKS.set(None if current is None else _held(current[0][index.to(current[0].device)]))
    try:
        yield
    finally:
        _TASKS.reset(token)


@contextlib.contextmanager
def checking() -> Iterator[None]:
    """surgeon's own checks: every row reads task 0, whatever ids a surrounding call gave."""
    token = _CHECKING.set(True)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def _held(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    return ids, int(ids.max()) if ids.numel() else -1


def current() -> tuple[torch.Tensor | None, int, bool]:
    """(the task ids in effect or None, the largest of them (-1 when none), whether a check is running)."""
    held = _TASKS.get()
    return (None, -1, _CHECKING.get()) if held is None else (*held, _CHECKING.get())
