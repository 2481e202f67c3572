"""Multitask prompt tuning (MPT, Wang et al. 2023): a shared prompt, scaled per task by a low-rank matrix.

The site and the graph rewrite are prompt tuning's (surgeon.adapters.virtual_tokens): v tokens in front
of the input embeddings, every sequence-derived length made n + v. The tokens differ per row: with the
shared table E (`prompt_embeddings`, v x hidden) and, per task t, the factors C_t
(`prefix_task_cols[t]`, v x r) and R_t (`prefix_task_rows[t]`, r x hidden), row b of task t_b gets

    P_b = E ⊙ (C_{t_b} R_{t_b})          (elementwise: a rank-r multiplicative mask of the shared prompt)

The task of each row comes with the call, `module(ids, task_ids=[...])` and `generate(..., task_ids=[...])`
(surgeon.routing), as PEFT's; one run-time helper (`task_prompts`) reads them. With num_tasks = 1 a call
may leave them out (every row is task 0); with more it must give them. surgeon's own checks run every
row as task 0 (routing.checking).

Init (PEFT's prompt_tuning_init): "random" (RANDOM), E ~ N(0, 1) (nn.Embedding), C and R ~ N(0, 0.02);
from a source MPT checkpoint (`init_source`: its adapter_model.safetensors, or a torch file, PEFT's
prompt_tuning_init_state_dict_path), "exact_source_task" takes its E and task `init_task`'s C and R,
"average_source_tasks" its E and the mean of its tasks' C and R (both make one task: num_tasks must be 1,
as PEFT's strict load needs), "only_source_shared" its E with fresh C and R. Each changes the function
("none" check). PEFT's TEXT init tokenizes a text, which needs a tokenizer surgeon does not load: refused.
A site trains v·hidden + num_tasks·r·(v + hidden) parameters. Merge is refused: nothing folds into a weight.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten
from .. import routing as task_routing
from ..errors import InputError
from .virtual_tokens import prepend, refuse_merge

FACTOR_STD = 0.02   # PEFT draws prefix_task_cols and prefix_task_rows from N(0, 0.02)
NAMES = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")


SOURCE_INITS = ("exact_source_task", "average_source_tasks", "only_source_shared")


def _check(opts: dict) -> None:
    if opts.get("init") == "text":
        raise ValueError("multitask_prompt_tuning: init 'text' (PEFT's TEXT) tokenizes prompt_tuning_init_text, "
                         "which needs a tokenizer surgeon does not load; use 'random', or import a PEFT checkpoint "
                         "(it holds the trained rows)")


def _source(opts: dict, v: int, hidden: int) -> dict[str, torch.Tensor]:
    """The source checkpoint's tensors an init from it reads, checked against this adapter's sizes."""
    init, path = opts["init"], opts.get("init_source")
    if not path:
        raise ValueError(f"multitask_prompt_tuning: init '{init}' reads a source MPT checkpoint: give init_source "
                         "(its adapter_model.safetensors)")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"multitask_prompt_tuning: init_source {path!r} could not be read: {error}") from error
    needed = ("prompt_embeddings",) if init == "only_source_shared" else NAMES
    missing = [name for name in needed if name not in state]
    if missing:
        raise ValueError(f"multitask_prompt_tuning: init_source {path!r} holds no {missing} (an MPT checkpoint has "
                         f"{list(NAMES)})")
    shared = state["prompt_embeddings"]
    if tuple(shared.shape) != (v, hidden):
        raise ValueError(f"multitask_prompt_tuning: init_source's prompt_embeddings {list(shared.shape)} does not "
                         f"fit num_virtual_tokens={v} x hidden={hidden}")
    if init == "only_source_shared":
        return {"prompt_embeddings": shared}
    if opts["num_tasks"] != 1:
        raise ValueError(f"multitask_prompt_tuning: init '{init}' makes one task's factors, so num_tasks must be 1 "
                         f"(got {opts['num_tasks']}), as PEFT's")
    cols, rows = state["prefix_task_cols"], state["prefix_task_rows"]
    if cols.dim() != 3 or tuple(cols.shape[1:]) != (v, opts["num_ranks"]) or tuple(rows.shape[1:]) != \
            (opts["num_ranks"], hidden) or rows.shape[0] != cols.shape[0]:
        raise ValueError(f"multitask_prompt_tuning: init_source's prefix_task_cols {list(cols.shape)} / "
                         f"prefix_task_rows {list(rows.shape)} do not fit tasks x {v} x num_ranks={opts['num_ranks']} "
                         f"/ tasks x num_ranks x {hidden}")
    if init == "average_source_tasks":
        return {"prompt_embeddings": shared, "prefix_task_cols": cols.mean(0, keepdim=True),
                "prefix_task_rows": rows.mean(0, keepdim=True)}
    task = opts["init_task"]
    if task >= cols.shape[0]:
        raise ValueError(f"multitask_prompt_tuning: init_task {task} is not one of init_source's {cols.shape[0]} "
                         "tasks")
    return {"prompt_embeddings": shared, "prefix_task_cols": cols[task:task + 1], "prefix_task_rows": rows[task:task + 1]}


def _init(opts, in_features, out_features, dtype, gen, weight):
    _check(opts)
    v, tasks, rank = opts["num_virtual_tokens"], opts["num_tasks"], opts["num_ranks"]
    params = {"prompt_embeddings": torch.randn(v, in_features, generator=gen),
              "prefix_task_cols": torch.randn(tasks, v, rank, generator=gen) * FACTOR_STD,
              "prefix_task_rows": torch.randn(tasks, rank, in_features, generator=gen) * FACTOR_STD}
    if opts["init"] in SOURCE_INITS:
        params.update(_source(opts, v, in_features))
    return {k: t.to(device=weight.device, dtype=dtype).clone() for k, t in params.items()}


def row_tasks(batch: int, tasks: int, where: str) -> torch.Tensor:
    """The task of each of `batch` rows, from the call's task ids (surgeon.routing)."""
    ids, largest, checking = task_routing.current()
    if checking or (ids is None and tasks == 1):
        return torch.zeros(batch, dtype=torch.long)
    if ids is None:
        raise InputError(f"the multitask_prompt_tuning adapter at '{where}' has a prompt per task (num_tasks="
                         f"{tasks}): pass task_ids=[...], one per row, to the call or to generate")
    if ids.numel() != batch:
        raise InputError(f"task_ids has {ids.numel()} ids but the multitask_prompt_tuning adapter at '{where}' "
                         f"sees {batch} rows: give one task id per row")
    if largest >= tasks:
        raise InputError(f"task id {largest} is not one of the multitask_prompt_tuning adapter's num_tasks={tasks} "
                         f"tasks (at '{where}')")
    return ids


def task_prompts(embedded: torch.Tensor, shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor,
                 where: str) -> torch.Tensor:
    """Each row's virtual tokens, batch x v x hidden: shared ⊙ (cols[t] @ rows[t]) for the row's task t
    (run-time helper of the graph; `embedded` is the embedding output, read for its batch size)."""
    tasks = row_tasks(embedded.shape[0], cols.shape[0], where).to(shared.device)
    return shared * torch.bmm(cols[tasks], rows[tasks])


def _forward(branch, x, table, params, opts):
    def prompt_of(b):
        (embedding,) = [u for u in table.users if u.target is aten.embedding.default and u.args[0] is table]
        node = b.op(task_prompts, embedding, params["prompt_embeddings"], params["prefix_task_cols"],
                    params["prefix_task_rows"], branch.path)
        looked_up = embedding.meta.get("val")
        if looked_up is not None:   # batch x v x hidden (the helper reads the call's task ids: no fake run)
            node.meta["val"] = looked_up.new_empty((looked_up.shape[0], opts["num_virtual_tokens"],
                                                    looked_up.shape[-1]))
        return node

    return prepend(branch, table, prompt_of, opts["num_virtual_tokens"], per_row=True)


def param_count(opts: dict, fan_in: int, fan_out: int) -> int:
    v, tasks, rank = opts["num_virtual_tokens"], opts["num_tasks"], opts["num_ranks"]
    return v * fan_in + tasks * rank * (v + fan_in)


MULTITASK_PROMPT_TUNING = AdapterKind(
    name="multitask_prompt_tuning",
    options={"num_virtual_tokens": Option(int, 8, positive=True),
             "num_tasks": Option(int, 1, positive=True),
             "num_ranks": Option(int, 1, positive=True),
             "init": Option(str, "random", choices=("random", "text", *SOURCE_INITS)),
             "init_source": Option(str, None),
             "init_task": Option(int, 0, bounds=(0, float("inf")))},
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge=refuse_merge("multitask prompt tuning") + " (and each row's prompt follows its task id)",
    param_count=param_count,
    init_check=lambda opts: "none",
    site_ops=("embedding",),
    rank_limit=lambda opts, fan_in, fan_out: None,
)
