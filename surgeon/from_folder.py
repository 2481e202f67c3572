"""`surgeon.compile_pretrained`: compile a model from its checkpoint folder without loading its weights.

    compiled = surgeon.compile_pretrained("llama-7b/", spec)                      # structure only
    compiled = surgeon.compile_pretrained("llama-7b/", spec, merge_to="merged/")  # and the merged checkpoint

The model is built from the folder's `config.json` (transformers' AutoConfig, then the architecture the
config names, else AutoModelForCausalLM) on the meta device, in the config's dtype, and compiled structure
only (surgeon.compile on meta weights: docs/large_models.md) on meta example input ids: no weight is read.
With `merge_to`, the running adapters (inserted, or quantized) are saved in surgeon's format to a temporary
folder and merged into the folder's safetensors by surgeon.merge_checkpoint, one tensor at a time, in the
folder's layout (shards and index kept, other files copied): the output is what `surgeon merge-checkpoint`
writes for the same adapter, bit for bit. Several adapters are merged one after another, in the spec's
order (each merge writes a complete intermediate checkpoint beside `merge_to`, removed afterwards): that is
what the merge pass does in memory, one adapter's delta rounded into the weights after the other.
Unless `verify=False`, the last merge is written to a hidden sibling of `merge_to`, checked layer by layer
against the folder with the adapters unmerged (surgeon.layerwise: one block's weights at a time) and only
then renamed to `merge_to`; a failure names the block and leaves `merge_to` unwritten. The report gets a
`merge_to` row saying how it was checked.

(The model is built by surgeon.config_model; surgeon.pretrained is the other direction:
Compiled.save_pretrained of a model held in memory.)

Refused, naming what and where, before anything is written: a folder without config.json, a config
transformers cannot build (unknown model_type, an architecture it lacks, custom code), targets that match
no module of the built model, a `merge_to` that exists or lies inside the folder, a folder without
safetensors weights (with merge_to), an adapter whose parameters a structure-only compile cannot have
(DoRA's magnitude, PiSSA's factors: computed from the weights' values; load a trained one with from_dir /
from_peft), and a kind with no exact merge. The folder itself is only read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config_model import build_meta_model, config_path as _config_path
from .errors import SurgeonError

DEFAULT_EXAMPLE = (2, 16)   # batch x length of the meta input ids (length capped by the model's positions)
_HOW = "compile_pretrained"


def compile_pretrained(path: "str | Path", spec: Any, example: Any = None, example_kwargs: dict | None = None, *,
                       merge_to: "str | Path | None" = None, dtype: "torch.dtype | str | None" = None,
                       dynamic: bool | None = None, fan_in_fan_out: bool | None = None,
                       allow_nonfinite: bool = False, verify: bool = True,
                       progress: Callable[[str], None] | None = None):
    """Build the model of the checkpoint folder `path` on the meta device and compile it structure only.

    `example`: the example input ids: None (meta ids of shape DEFAULT_EXAMPLE, 2 x 16), a shape
    `(batch, length)`, or tensors (their shapes and dtypes are used, on meta). `example_kwargs` as for
    surgeon.compile (meta tensors; e.g. an attention_mask to capture it as an input). `dtype`: the model's
    dtype (default: the config's, as transformers' from_config and from_pretrained use it).

    Returns the structure-only Compiled (its report, merge_plan(), save_adapter of the adapters as the spec
    initialized or loaded them). With `merge_to`, the merged checkpoint is written there first and
    `compiled.merged_checkpoint` is merge_checkpoint's MergeSummary of it (None without merge_to).
    `fan_in_fan_out` and `allow_nonfinite` are merge_checkpoint's; the layout default comes from the
    compile (GPT-2's Conv1D sites store their weight in x out).

    `verify` (with merge_to): check the merged checkpoint layer by layer against the folder's with the adapters
    unmerged (surgeon.layerwise, on example ids of `example`'s shape, or `example`'s own ids) before it is
    renamed to merge_to; a failure raises LayerwiseError naming the block and leaves merge_to unwritten. The
    result is the report's `merge_to` row and `compiled.merged_checkpoint.verification` (None when skipped).
    """
    from .compiled import compile as surgeon_compile, load_spec

    folder = Path(path)
    config_path = _config_path(folder, _HOW)
    spec = load_spec(spec)   # everything that needs no model first
    merge_to = _check_merge_to(folder, merge_to) if merge_to is not None else None
    model = build_meta_model(folder, dtype)
    where = f"{type(model).__name__} built from '{config_path}'"
    args = meta_example(model, example)
    kwargs = {k: (torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v)
              for k, v in (example_kwargs or {}).items()} or None
    try:
        compiled = surgeon_compile(model, args, spec, kwargs, dynamic=dynamic, progress=progress)
    except SurgeonError as error:   # say which model: the spec's targets are checked against the folder's
        if error.args and isinstance(error.args[0], str):
            error.args = (f"{error.args[0]} [{_HOW}: the {where}]", *error.args[1:])
        raise
    compiled.merged_checkpoint = None
    if merge_to is not None:
        compiled.merged_checkpoint = merge_into(compiled, folder, merge_to, fan_in_fan_out, allow_nonfinite,
                                                progress, verify=verify, example=example, dtype=dtype)
    return compiled


# ---------------------------------------------------------------- the example

def meta_example(model: torch.nn.Module, example: Any = None) -> tuple:
    """Meta input ids: DEFAULT_EXAMPLE, a (batch, length) shape, or the shapes and dtypes of given tensors."""
    if example is None:
        batch, length = DEFAULT_EXAMPLE
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and positions >= 2:
            length = min(length, positions)
        return (torch.empty(batch, length, dtype=torch.long, device="meta"),)
    if isinstance(example, torch.Tensor):
        return (torch.empty_like(example, device="meta"),)
    if isinstance(example, (tuple, list)) and example and all(isinstance(d, int) for d in example):
        if any(d < 1 for d in example):
            raise SurgeonError(f"{_HOW}: example shape {tuple(example)} must have sizes >= 1")
        return (torch.empty(*example, dtype=torch.long, device="meta"),)
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(torch.empty_like(t, device="meta") for t in example)
    raise SurgeonError(f"{_HOW}: example must be None, a shape like (2, 16) or tensors, got {example!r}")


# ---------------------------------------------------------------- the merged checkpoint

def _check_merge_to(folder: Path, merge_to: "str | Path") -> Path:
    """Checked before the model is built: merge_to is new and outside the folder, the folder has weights."""
    from . import merge_checkpoint as mc

    merge_to = Path(merge_to)
    if os.path.lexists(merge_to):
        what = "is a symbolic link" if merge_to.is_symlink() else "exists"
        raise SurgeonError(f"{_HOW}: merge_to '{merge_to}' {what}; name a new folder for the merged checkpoint")
    source, target = folder.resolve(), merge_to.parent.resolve() / merge_to.name
    if target == source or source in target.parents:
        raise SurgeonError(f"{_HOW}: merge_to '{merge_to}' is inside the checkpoint folder '{folder}', which is "
                           "only read; name a folder outside it")
    try:
        mc._shard_files(folder)
    except SurgeonError as error:
        raise SurgeonError(f"{_HOW}: merge_to needs the folder's safetensors weights: {error}") from error
    return merge_to


def merge_into(compiled, folder: Path, merge_to: Path, fan_in_fan_out: bool | None = None,
               allow_nonfinite: bool = False, progress: Callable[[str], None] | None = None, *,
               verify: bool = True, example: Any = None, dtype: "torch.dtype | str | None" = None):
    """Merge the compile's running adapters into folder's checkpoint, written to merge_to (merge_checkpoint);
    with `verify`, written beside it, checked layer by layer (surgeon.layerwise) and then renamed to it."""
    from . import merge_checkpoint as mc

    states = compiled.adapters
    running = [name for name, state in states.items() if state.status in ("inserted", "quantized")]
    if not running:
        raise SurgeonError(f"{_HOW}: no adapter to merge into '{folder}' (adapters: "
                           f"{ {n: s.status for n, s in states.items()} }); merge_to merges inserted adapters")
    for name in running:
        reason = next((r for s in states[name].sites if (r := states[name].spec.kind.refusal(s.options))), "")
        if reason:
            raise SurgeonError(f"{_HOW}: adapter '{name}' ({states[name].spec.type}) cannot be merged: {reason}")
        unknown = sorted({p for ps in compiled.adapter_weights(name).values() for p, t in ps.items() if t.is_meta})
        if unknown:
            raise SurgeonError(
                f"{_HOW}: adapter '{name}' ({states[name].spec.type}) has parameters {unknown} computed from the "
                "base weights' values, which a structure-only compile does not read; load the trained adapter "
                "with from_dir or from_peft in the spec to merge it")
    names = {n for shard in mc._shard_files(folder) for n in mc._read_header(folder / shard)[0]}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="surgeon-adapters-") as tmp:
        adapters = []
        for name in running:
            directory = Path(tmp) / name
            compiled.save_adapter(name, directory)
            _match_checkpoint_names(compiled, name, directory, names, folder)
            flag = fan_in_fan_out if fan_in_fan_out is not None else _layout(states[name])
            adapters.append((name, directory, flag))
        merge_to.parent.mkdir(parents=True, exist_ok=True)
        mc._remove_stale_temps(merge_to)   # what runs killed outright left beside it (their process is gone)
        # checked before it gets its name: merge_to holds a checkpoint that passed, or nothing
        staging = merge_to.parent / f".{merge_to.name}.{mc._run_tag()}.unchecked.tmp" if verify else merge_to
        if verify:
            shutil.rmtree(staging, ignore_errors=True)   # left by a killed run of this process id
        summary = _merge_in_sequence(folder, adapters, merge_to, allow_nonfinite, progress, last=staging)
        summary.verification = None
        if verify:
            summary.verification = _check_and_rename(folder, staging, merge_to, [d for _, d, _ in adapters],
                                                     example, dtype, progress)
            summary.out_dir = merge_to
    _report_row(compiled, summary, merge_to, time.perf_counter() - start)
    return summary


def _check_and_rename(folder: Path, staging: Path, merge_to: Path, adapters: list[Path], example: Any, dtype,
                      progress):
    """surgeon.layerwise on the merged checkpoint written to `staging`, then renamed to merge_to; removed on
    a failure (or SIGTERM), and the LayerwiseError says so."""
    from . import merge_checkpoint as mc
    from .layerwise import LayerwiseError, LayerwiseUnsupported, verify_layerwise

    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        example = example[0]
    if isinstance(example, torch.Tensor) and example.is_meta:
        example = tuple(example.shape)
    if progress:
        progress(f"checking the merged checkpoint layer by layer against '{folder}' with the adapters unmerged")
    with mc._sigterm_unwinds():
        try:
            try:
                result = verify_layerwise(folder, staging, adapters, example, dtype=dtype, progress=progress)
            except LayerwiseError as error:
                cls = type(error)
                what = "cannot be checked layer by layer" if cls is LayerwiseUnsupported else \
                    "failed its layer-by-layer check"
                raise cls(f"{_HOW}: the merged checkpoint {what}, so nothing was written to merge_to '{merge_to}' "
                          f"(verify=False writes it unchecked): {str(error).replace(str(staging), str(merge_to))}"
                          ) from error
            if os.path.lexists(merge_to):
                raise SurgeonError(f"{_HOW}: merge_to '{merge_to}' appeared while the merged checkpoint was being "
                                   "written; it is left as it is, and the merged checkpoint removed")
            os.rename(staging, merge_to)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result


def _report_row(compiled, summary, merge_to: Path, seconds: float) -> None:
    """The report's `merge_to` row: the tensors merged, and the check of the merged checkpoint."""
    from .pipeline import PassRow

    rows = compiled.report.rows
    params, trainable, nodes = (rows[-1].params[1], rows[-1].trainable, rows[-1].nodes[1]) if rows else (0, 0, 0)
    result = summary.verification
    notes = [f"'{merge_to}': {len(summary.shards)} shard file(s), {len(summary.merged)} tensors merged, "
             f"{summary.copied} copied, {summary.bytes_written:,} bytes"]
    if result is None:
        notes.append("the merged checkpoint was not checked (verify=False)")
    else:
        notes.append(f"checked {result.mode} against the base checkpoint with the adapters unmerged, on example ids "
                     f"{list(result.example)}: {len(result.blocks)} blocks and {len(result.others)} other modules "
                     f"run, {result.unreached} tensors the forward does not read compared bit for bit; at most "
                     f"{result.peak_bytes / 2**20:.1f} MiB of checkpoint tensors held (the largest module: "
                     f"{result.largest_module_bytes / 2**20:.1f} MiB)")
    rows.append(PassRow("merge_to", len(summary.merged), [], (params, params), trainable, (nodes, nodes), seconds,
                        "skipped (verify=False)" if result is None else str(result), notes))


def _layout(state) -> bool | None:
    """True when every site stores its weight in x out (GPT-2's Conv1D: addmm), False when none does."""
    ops = {site.op == "addmm" for site in state.sites}
    return ops.pop() if len(ops) == 1 else None


def _match_checkpoint_names(compiled, name: str, directory: Path, names: set[str], folder: Path) -> None:
    """Checkpoints written without the model's base prefix (GPT-2's `h.0...` for `transformer.h.0...`):
    rename the saved adapter's module paths to the checkpoint's names, as transformers maps them on loading."""
    paths = [site.path for site in compiled.adapters[name].sites]
    if all(f"{p}.weight" in names for p in paths):
        return
    prefix = getattr(compiled.original, "base_model_prefix", "") or ""
    renamed = {p: p[len(prefix) + 1:] for p in paths if prefix and p.startswith(prefix + ".")}
    if not renamed or not all(f"{renamed.get(p, p)}.weight" in names for p in paths):
        return   # merge_checkpoint names the first module it cannot find
    from .adapter_io import load_adapter_dir, save_adapter_dir

    config = json.loads((directory / "adapter_config.json").read_text())
    if "quantized" in config:
        raise SurgeonError(f"{_HOW}: '{folder}' stores its tensors without the '{prefix}.' prefix; a quantized "
                           f"adapter is not renamed: merge adapter '{name}' before quantizing it")
    loaded = load_adapter_dir(directory)
    weights = {renamed.get(p, p): t for p, t in loaded.weights.items()}
    site_options = {renamed.get(p, p): o for p, o in loaded.site_options.items()}
    shutil.rmtree(directory)
    save_adapter_dir(directory, config["name"], config["type"], config["options"], weights, site_options)


def _merge_in_sequence(folder: Path, adapters: list, merge_to: Path, allow_nonfinite: bool, progress,
                       last: Path | None = None):
    """merge_checkpoint per adapter: the first reads `folder`, each later one the previous output; every
    intermediate checkpoint is a hidden sibling of merge_to, removed when the next is written or on failure.
    The last adapter's output goes to `last` (default: merge_to)."""
    from . import merge_checkpoint as mc

    final = merge_to if last is None else last
    source, made = folder, []
    try:
        for i, (name, directory, flag) in enumerate(adapters):
            is_last = i == len(adapters) - 1
            out = final if is_last else merge_to.parent / f".{merge_to.name}.{mc._run_tag()}.step{i + 1}.tmp"
            if progress:
                what = "an intermediate checkpoint" if not is_last else "merge_to" if out == merge_to else \
                    "the checkpoint to check before it becomes merge_to"
                progress(f"merging adapter '{name}' into {what} '{out}', tensor by tensor")
            if not is_last:
                shutil.rmtree(out, ignore_errors=True)   # left by a killed run of this process id
            summary = mc.merge_checkpoint(source, directory, out, fan_in_fan_out=flag,
                                          allow_nonfinite=allow_nonfinite)
            if not is_last:
                made.append(out)
            if len(made) > 1 or (is_last and made):
                shutil.rmtree(made.pop(0), ignore_errors=True)
            source = out
        return summary
    finally:
        for out in made:
            shutil.rmtree(out, ignore_errors=True)
