"""The pass manager: run a literal list of passes, each linted, verified and reported.

A pass is a small frozen dataclass with a kebab-case `name`, its options as fields, a
`check` saying how it must relate to the graph before it ("exact": the same outputs bit for
bit, e.g. inserting zero-initialized adapters; "close": equal within a dtype-aware tolerance,
e.g. a merge; "none": the function changes, e.g. removing a trained adapter), and
`run(gm, ctx) -> PassResult`. Passes edit the canonical graph in place but never write into a
tensor: changed weights are new tensors, so the user's model is never modified.

A pass that reads no weight values declares `needs_weights = False` (insert); every other pass is
taken to need them. On a structure-only graph (base weights on the meta device: surgeon.compile of
a model built under `torch.device("meta")`) such a pass is refused before it runs, and the numeric
checks are skipped, each row's check saying so.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import PassError, SurgeonError
from .graph import compute_nodes, count_parameters, lint, meta_tensors
from .modes import evaluating
from . import routing

if TYPE_CHECKING:   # the spec's classes, for annotations only: spec checks pass entries against passes
    from .spec import AdapterSpec, Spec

# max |after - before| / max |before| allowed for "close" passes, by output dtype (reason: the
# rounding of a reordered sum of K products grows like eps * sqrt(K); these leave headroom for
# K up to ~10^4 while still catching any real change of the function)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class SiteState:
    """One place an adapter sits: a linear-like op and the adapter nodes around it."""

    path: str
    op: str                      # "linear" (W: out x in) or "addmm" (W: in x out, GPT-2 Conv1D)
    weight: str                  # get_attr target of the base weight
    in_features: int
    out_features: int
    options: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)      # param name -> get_attr target
    nodes: list[str] = field(default_factory=list)            # names of the adapter's nodes
    base_output: str = ""
    output: str = ""
    merged: dict[str, torch.Tensor] = field(default_factory=dict)  # params kept after merge
    parked: dict[str, torch.Tensor] = field(default_factory=dict)  # params of an inactive adapter


@dataclass
class AdapterState:
    spec: AdapterSpec
    sites: list[SiteState] = field(default_factory=list)
    status: str = "declared"     # declared | inserted | inactive | lowered | merged | removed | combined | quantized

    @property
    def param_count(self) -> int:
        """Trained parameters: each site's own, plus each copy of the kind's trained shared ones once."""
        kind = self.spec.kind
        own = sum(kind.param_count(s.options, s.in_features, s.out_features) for s in self.sites)
        if kind.shared_count is None:
            return own
        copies = {kind.shared_group(s.options) if kind.shared_group else None: s.options for s in self.sites}
        return own + sum(kind.shared_count(options) for options in copies.values())


@dataclass
class Context:
    spec: Spec
    example_args: tuple
    example_kwargs: dict
    adapters: dict[str, AdapterState]
    generator: torch.Generator
    history: list[str] = field(default_factory=list)
    more_examples: list[tuple[tuple, dict]] = field(default_factory=list)   # e.g. a second shape

    @property
    def examples(self) -> list[tuple[tuple, dict]]:
        """Every input the numeric checks run on: the example, then any more (a second shape)."""
        return [(self.example_args, self.example_kwargs), *self.more_examples]

    def select(self, names: tuple[str, ...] | None, status: tuple[str, ...],
               acting: str | None = None) -> list[AdapterState]:
        """The adapters a pass acts on: those named (or all) whose status is in `status`.

        With `acting` (the pass's name) a silent no-op is an error: every named adapter must be in
        `status`, and without names at least one adapter must be."""
        chosen = [self.adapters[n] for n in names] if names else list(self.adapters.values())
        lowered = [a.spec.name for a in chosen if a.status == "lowered"]
        if lowered and "inserted" in status:
            raise PassError("?", f"adapters {lowered} were lowered into kernels; run merge/unmerge/remove/"
                                 "activate before `lower`, or compile again")
        found = [a for a in chosen if a.status in status]
        if acting:
            wanted = " or ".join(status)
            idle = next((a for a in chosen if a.status not in status), None) if names else None
            if idle or not found:
                states = ", ".join(f"{n}={a.status}" for n, a in self.adapters.items()) or "none declared"
                what = (f"adapter '{idle.spec.name}' is {idle.status}, not {wanted}: nothing to {acting}" if idle
                        else f"no {wanted} adapter to {acting}")
                raise PassError(acting, f"{what} (adapters: {states})", before=self.history)
        return found


@dataclass
class PassResult:
    matches: int = 0
    rejections: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pass(Protocol):
    name: str
    check: str

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult: ...


@dataclass
class PassRow:
    name: str
    matches: int
    rejections: list[tuple[str, str]]
    params: tuple[int, int]
    trainable: int
    nodes: tuple[int, int]
    seconds: float
    check: str
    notes: list[str]


def run_outputs(gm: fx.GraphModule, ctx: Context) -> list[torch.Tensor]:
    """The graph's flattened tensor outputs on every example (ctx.examples), one list.

    Run in eval mode (a check never drops or updates BN statistics: surgeon.modes) and with every
    parameter's requires_grad off (`frozen`), so that graphs compare as functions of their values."""
    outputs = []
    with torch.no_grad(), evaluating(gm), frozen(gm), routing.checking():   # examples carry no task ids
        for args, kwargs in ctx.examples:
            args, kwargs = placed(gm, (args, kwargs))
            out = gm(*args, **kwargs)
            outputs += [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return outputs


@contextlib.contextmanager
def frozen(gm: fx.GraphModule) -> Iterator[None]:
    """Every parameter of `gm` with requires_grad off for the block, each flag restored after.

    The flag picks a kernel even under no_grad: `aten.linear` on a 3-D input that is no 2-D view
    (a transposed one, as `F.multi_head_attention_forward` feeds its projections) folds into one mm
    when the weight requires grad and runs a bmm when it does not, and the two round differently.
    `insert` freezes the base weights, so without this an untouched linear with bit-identical inputs
    (SigLIP's pooling head, WavLM's attention) differed in its last bit and an exact insert failed.
    """
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def placed(gm: fx.GraphModule, inputs: Any) -> Any:
    """`inputs` on the module's device, floating ones in the module's dtype where they had the dtype it
    was captured in: after `.to(...)` of the module, the example is moved with it."""
    captured = getattr(gm.meta.get("surgeon_capture"), "dtype", None)
    dtype, device = getattr(gm, "dtype", None), getattr(gm, "device", None)
    if dtype is None or device is None:
        return inputs

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        follows = t.is_floating_point() and t.dtype == captured and dtype != captured
        return t.to(device=device, dtype=dtype if follows else t.dtype)
    return pytree.tree_map(move, inputs)


def compare(before: list[torch.Tensor], after: list[torch.Tensor], mode: str,
            compute_dtypes: set[torch.dtype] = frozenset()) -> tuple[bool, str]:
    """Compare flattened outputs: 'exact' needs equality, 'close' a dtype-aware relative error.

    The tolerance is the output dtype's, or the loosest of `compute_dtypes` (the floating dtypes of
    the graph's weights) when that is looser: an fp16 model whose logits are cast to fp32 at the end
    rounds like fp16, not like fp32. A non-finite value fails every mode unless the reference has
    the same one at that position (NaN for NaN, as torch.testing's equal_nan); the error is measured
    over the positions where the reference is finite.
    """
    if len(before) != len(after):
        return False, f"{len(before)} outputs before, {len(after)} after"
    worst = 0.0
    for index, (a, b) in enumerate(zip(before, after)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, f"output changed from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)}"
        if (a.is_floating_point() or a.is_complex()) and not (all_finite(a) and all_finite(b)):
            why = _non_finite(index, a, b)
            if why:
                return False, why
            finite = torch.isfinite(a)   # b matches a everywhere else
            a, b = a[finite], b[finite]
        if a.numel() == 0:
            continue
        if mode == "exact" or not a.is_floating_point():
            if not torch.equal(a, b):
                diff = (a.double() - b.double()).abs().max().item()
                return False, f"outputs differ (max abs diff {diff:.3g}); expected exact equality"
            continue
        low, high = torch.aminmax(a)   # max |a| without a copy of a
        scale = torch.maximum(low.abs(), high.abs()).double().clamp_min(1e-12)
        diff = a.double()
        rel = (diff.sub_(b).abs_().max() / scale).item()
        worst = max(worst, rel)
        dtype = max({a.dtype, *compute_dtypes}, key=lambda d: TOLERANCE.get(d, 1e-5))
        if rel > TOLERANCE.get(dtype, 1e-5):
            why = f"{a.dtype}" if dtype == a.dtype else f"{a.dtype} outputs of {dtype} weights"
            return False, f"relative error {rel:.3g} exceeds {TOLERANCE.get(dtype, 1e-5):g} for {why}"
    return True, "exact" if mode == "exact" else f"rel err {worst:.1e}"


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite (True for other tensors), in one pass and
    without a mask: the min and the max carry any NaN or Inf (torch.isfinite builds several masks)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return not tensor.is_complex() or bool(torch.isfinite(tensor).all())
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):   # a dtype aminmax does not take (float8)
        return bool(torch.isfinite(tensor.float()).all())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _non_finite(index: int, a: torch.Tensor, b: torch.Tensor) -> str:
    """Why output `index`'s non-finite values differ from the reference `a`'s ("" when they match)."""
    where = f"output {index} ({b.dtype}{list(b.shape)})"
    finite = torch.isfinite(a)
    new = int((finite & ~torch.isfinite(b)).sum())
    if new:
        return f"{where} has {new} non-finite value{'s' * (new != 1)} where the reference is finite"
    changed = int((~finite & ~((a == b) | (a.isnan() & b.isnan()))).sum())
    if changed:
        return f"{where} changed {changed} of the reference's non-finite values"
    return ""


def compute_dtypes(gm: fx.GraphModule) -> set[torch.dtype]:
    """The floating dtypes of the graph's parameters and buffers."""
    return {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()}


def run_pipeline(gm: fx.GraphModule, passes: list, ctx: Context, verify: bool = True,
                 progress: Callable[[str], None] | None = None) -> list[PassRow]:
    """Run each pass in order; lint, verify and report after each; raise PassError on failure."""
    rows = []
    meta = meta_tensors(gm)
    skipped = "skipped (meta weights)" if meta else "skipped"
    verify = verify and not meta   # nothing to compute on: a structure-only graph is never checked numerically
    before = run_outputs(gm, ctx) if verify else []
    for index, p in enumerate(passes):
        if progress:
            progress(f"[{index + 1}/{len(passes)}] {p.name}")
        if meta and getattr(p, "needs_weights", True):
            raise PassError(p.name, f"it needs the weights' values, and {len(meta)} of this graph's tensors are on the "
                                    f"meta device (a structure-only compile; e.g. '{meta[0]}'): compile the model "
                                    f"with its weights loaded to run it{getattr(p, 'structure_hint', '')}",
                            before=ctx.history)
        params0, nodes0 = count_parameters(gm)[0], compute_nodes(gm)
        mode = p.check(ctx) if callable(p.check) else p.check
        start = time.perf_counter()
        try:
            result = p.run(gm, ctx)
            lint(gm)
        except PassError as error:
            if error.pass_name == "?":
                raise PassError(p.name, str(error).split(": ", 1)[-1], before=ctx.history) from error
            raise
        except SurgeonError:
            raise
        except Exception as error:
            raise PassError(p.name, f"{type(error).__name__}: {error}", before=ctx.history) from error
        seconds = time.perf_counter() - start
        check = skipped
        if verify:
            try:
                after = run_outputs(gm, ctx)
            except Exception as error:
                shapes = ", ".join(str([list(t.shape) for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor)])
                                   for example in ctx.examples)
                raise PassError(p.name, f"the graph after it fails to run on the checked inputs ({shapes}): "
                                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                                before=ctx.history) from error
        if verify and mode != "none":
            ok, check = compare(before, after, mode, compute_dtypes(gm))
            if not ok:
                raise PassError(p.name, f"numeric check failed against the graph before it: {check}",
                                before=ctx.history)
            before = after
        elif verify:
            before = after
            check = "changes function"
        params1, trainable = count_parameters(gm)
        rows.append(PassRow(p.name, result.matches, result.rejections, (params0, params1), trainable,
                            (nodes0, compute_nodes(gm)), seconds, check, result.notes))
        ctx.history.append(p.name)
    return rows
