"""Mixed batches: one adapter per row of a batch, PEFT's `adapter_names` convention.

`compiled.module(input_ids, ..., adapter_names=[...])` and `compiled.generate(..., adapter_names=[...])`
take one adapter name per row (`"__base__"`: no adapter for that row). The graph the user calls without
`adapter_names` is never touched: the first mixed call builds, from it, a second GraphModule (the "mixed
graph") and keeps it until the graph, the adapters' states or the module's placement change. The same is
done for the generator's prefill and decode graphs.

Design:
- The mixed graph is a copy of the graph (sharing every tensor) with every attached adapter detached
  (adapter_ops.detach: the base graph) and one `call_module` node per adapted base op, a `MixedSite`,
  holding the adapters that can join a mixed batch at that op (inserted and inactive ones, their
  tensors shared with the compiled module: training it changes what the mixed graph computes).
- The graph takes one more input, a `RowPlan`: each row's adapter name and the rows grouped by adapter,
  made once per call from the names.
- A batch of several adapters runs the stacked path, a fixed number of ops per site whatever adapters
  are present: the site's LoRA / LoRA-XS / VeRA routes as one bank of low-rank factors (A' [n+1, K, R_MAX],
  B' [n+1, R_MAX, N], the scale in B', slot 0 zero: "__base__") and its IA3 routes as scale vectors
  (slot 0 ones), built once and rebuilt when a tensor changes (version counters) or with the mixed graph;
  each row gathers its slot (`index_select`) and the update is `y * scale`, then `baddbmm(y, bmm(x, A'),
  B')` over the rows (an input scale: `x * scale`). A flattened site input (batch * length, features;
  GPT-2's Conv1D addmm) is viewed as (batch, length, features).
- The loop runs the rest: per adapter present, gather its rows (`index_select`), run the kind's own
  forward on them (the graph code the kind builds for `set_active`, run eagerly) and write them back
  (`index_copy`). It serves a batch whose rows all name one adapter (its forward on the whole batch,
  no gather: the same ops as `set_active`, bit for bit), a call that records gradients, a route that
  does not stack (a LoRA with a bias on B) and a large batch of short rows with few adapters
  (GATHER_MAX_ROWS, GATHER_MIN_TOKENS, GATHER_ROWS_PER_ADAPTER).
- On CUDA, a site whose routes are all plain LoRA runs the mixed-batch kernels (kernels/mixed_lora.py); the
  mixed graph is lowered there (`lowers`): each such site, its base op and the pointwise ops after it become
  one `mixed_lora_linear` region (kernels/mixed_lora_region.py: the epilogue fused into the expand kernel).

Kinds that join: LoRA (rsLoRA too; default / gaussian init or loaded weights), LoRA-XS, VeRA (each an
additive per-row update) and IA3 (a per-row scale of the output, or of the input with `on: input`), on
linear and GPT-2 Conv1D sites, in eval mode. Everything else is refused with `SurgeonError` saying why
(`mixable`).
"""
from __future__ import annotations

import copy
import operator
import warnings
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .adapters import EagerBranch
from .adapters.lora import BASE_INITS
from .errors import InputError, SurgeonError
from .graph import get_tensor, placement

BASE = "__base__"
# the kinds whose forward is an independent function of each row (x row -> y row) with no base-weight
# rewrite, and the halves of it that act ("output": after the base op, "input": before it)
_HALVES = {
    "lora": lambda opts: ("output",),
    "lora-xs": lambda opts: ("output",),
    "vera": lambda opts: ("output",),
    "ia3": lambda opts: (opts.get("on", "output"),),
}
_SITE_OPS = ("linear", "addmm")
_ATTACHED = ("inserted",)
_USABLE = ("inserted", "inactive")
_BAKED = {"merged": "is merged into the base weights", "combined": "is combined into the base weights",
          "lowered": "runs as a generated kernel region (lowered)", "quantized": "is quantized"}


def refusal(state) -> str:
    """Why this adapter cannot join a mixed batch ("" when it can)."""
    spec, status = state.spec, state.status
    if status in _BAKED:
        return f"it {_BAKED[status]}, which a per-row selection cannot take back out"
    if status not in _USABLE:
        return f"it is {status}, not inserted"
    halves = _HALVES.get(spec.type)
    if halves is None:
        why = spec.kind.refusal(spec.options)   # a kind no weight holds says why (X-LoRA's per-token routing)
        return (f"a '{spec.type}' adapter is not a per-row low-rank update or scale{f' ({why})' if why else ''}; "
                f"mixed batches take {', '.join(sorted(_HALVES))}")
    for site in state.sites:
        if site.op not in _SITE_OPS:
            return f"it sits on a {site.op} op at '{site.path}'; mixed batches take linear and GPT-2 Conv1D sites"
        if site.options.get("init") in BASE_INITS:
            return (f"its {site.options['init']} init rewrote the base weight of '{site.path}' into a residual, "
                    "so rows without it would not see the base model")
        if site.options.get("groups", 1) > 1 or "experts" in site.options:
            return f"its site '{site.path}' is a grouped conv or an expert stack"
    return ""


class RowPlan:
    """One call's rows grouped by adapter: `groups[name]` the row indices (ascending), `whole` the one name
    when every row has it, `names` the name of each row. Token indices of flattened inputs are made once per
    (name, length), and each site's slot index (`slots`) once per set of adapter names and device. A plan is
    one call's, or one generate's: adapter tensors changed in place while it runs are not seen by it."""

    def __init__(self, batch: int, groups: dict[str, torch.Tensor], whole: str | None,
                 names: list[str] | None = None):
        self.batch, self.groups, self.whole = batch, groups, whole
        if names is None:   # from the groups: every row not in one is a __base__ row
            names = [BASE] * batch
            for name, rows in groups.items():
                for row in rows.tolist():
                    names[row] = name
        self.names = tuple(names)
        self._tokens: dict[tuple[str, int], torch.Tensor] = {}
        self._slots: dict[tuple, tuple[torch.Tensor, int] | None] = {}
        # MixedSite -> (its SiteBank, the rows' factors gathered from it, the rows' slots): a generate's decode
        # steps share one plan, so each step after the first reuses the gather (MixedSite._gather)
        self.gathered: dict[nn.Module, tuple[Any, torch.Tensor | None, torch.Tensor]] = {}

    @property
    def all_base(self) -> bool:
        """Every row is "__base__" (no adapter)."""
        return self.whole == BASE

    def rows(self, name: str, leading: int, device: torch.device) -> torch.Tensor | None:
        rows = self.groups.get(name)
        if rows is None:
            return None
        if rows.device != device:
            rows = self.groups[name] = rows.to(device)
        if leading == self.batch:
            return rows
        if leading % self.batch:
            raise SurgeonError(f"mixed batch: an adapted op's input has {leading} rows, neither the batch "
                               f"({self.batch}) nor a multiple of it")
        length = leading // self.batch
        key = (name, length)
        if key not in self._tokens:
            self._tokens[key] = (rows[:, None] * length + torch.arange(length, device=device)).flatten()
        return self._tokens[key]

    def slots(self, names: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, int] | None:
        """(each row's slot in a bank over `names`: 1 + the position of its adapter there, 0 for a row whose
        adapter is not in `names`; how many of `names` the batch holds), or None when it holds none. Made
        once per call for each set of names (sites with the same adapters share it) and device."""
        key = (names, device)
        if key not in self._slots:
            where = {name: slot for slot, name in enumerate(names, 1)}
            slots = [where.get(name, 0) for name in self.names]
            present = len({slot for slot in slots if slot})
            self._slots[key] = (torch.tensor(slots, dtype=torch.long, device=device), present) if present else None
        return self._slots[key]


# when a site runs the gathered path rather than the loop: a batch of at most GATHER_MAX_ROWS rows, or no more
# rows than the bank has slots (a generate's decode steps reuse the gather); rows of at least GATHER_MIN_TOKENS
# tokens (a prefill: the gather's copy of R_MAX (K + N) numbers per row is small next to the row's GEMMs); at
# most GATHER_ROWS_PER_ADAPTER rows per adapter present (the loop's cost is per adapter, the gather's per row).
# Measured on a site's CPU time (1 thread; LoRA r=16, 16 adapters, K, N of 512 / 1376; docs/serving.md): the
# gathered path's time / the loop's was 0.2-1.35 at 16 rows, 0.25-1.03 at 8 tokens a row and 0.2-0.76 at 32
# (up to 128 rows over 2 to 16 adapters), 0.2-0.8 at 1-2 tokens with at most 4 rows per adapter, and 0.9-2.9
# at 1-2 tokens from 8 rows per adapter up.
GATHER_MAX_ROWS = 16
GATHER_MIN_TOKENS = 8
GATHER_ROWS_PER_ADAPTER = 4
_VERSION = operator.attrgetter("_version")


def _form(side: str, kind_name: str, params: dict, opts: dict, dims: tuple[int, int]) -> str | None:
    """How a route joins a site's stacked bank: "lowrank" (an update B' A' x, B' A' = the kind's low-rank
    map with its scale), "scale" (IA3: a per-row scale vector of the site's output or input), or None (it
    keeps the loop: e.g. a LoRA with a bias on B)."""
    if kind_name == "ia3":
        want = dims[1] if side == "output" else dims[0]
        scale = params.get("ia3_l")
        return "scale" if set(params) == {"ia3_l"} and scale.dim() == 1 and scale.shape[0] == want else None
    if side != "output" or "experts" in opts or opts.get("groups", 1) != 1:
        return None
    keys = {"lora": {"lora_A", "lora_B"}, "lora-xs": {"lora_A", "lora_R", "lora_B"},
            "vera": {"vera_A", "vera_B", "vera_lambda_d", "vera_lambda_b"}}.get(kind_name)
    if keys is None or set(params) != keys or any(t.dim() not in (1, 2) for t in params.values()):
        return None
    return "lowrank"


def _factors(kind_name: str, params: dict, opts: dict, dims: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [r, K], B' [N, r]) in float64 with the kind's update B' A' x, its scale inside B'."""
    from .adapters.lora import lora_scale

    p = {name: t.detach().double() for name, t in params.items()}
    K, N = dims
    if kind_name == "lora":
        return p["lora_A"], lora_scale(opts) * p["lora_B"]
    if kind_name == "lora-xs":   # B R A x, scaled as the kind's forward scales it
        from .adapters.lora_xs import _scale

        return p["lora_A"], _scale(opts) * (p["lora_B"] @ p["lora_R"])
    # vera: lambda_b * (B[:N] (lambda_d * (A[:, :K] x)))
    return p["vera_lambda_d"][:, None] * p["vera_A"][:, :K], p["vera_lambda_b"][:, None] * p["vera_B"][:N]


class SiteBank:
    """The stacked bank of one MixedSite, slot 0 the "__base__" slot (adds nothing, scales by 1) and slot i
    the i-th of the site's stacked adapters: `a` [n + 1, K, R_MAX] and `b` [n + 1, R_MAX, N] (the low-rank
    routes' A'^T and B'^T, the scale folded into B', zeros past each rank and in the slots of other
    routes), views of `factors` [n + 1, R_MAX (K + N)] (slot i's row: A'[i] then B'[i], so that one gather
    takes both), `scale` [n + 1, features] (IA3 routes; ones elsewhere); None where the site has no such
    route."""

    def __init__(self, factors: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
                 scale: torch.Tensor | None):
        self.factors, self.a, self.b, self.scale = factors, a, b, scale


class MixedSite(nn.Module):
    """The adapters of one base op in a mixed graph: `side` "output" (after the op: x, y -> y') or "input"
    (before it: x -> x'). Routes: (adapter, kind, options, (in, out), tensors); the tensors are plain
    references (shared with the compiled module), not registered: this module is never moved itself.

    A batch of several adapters runs the gathered path: the routes that stack (LoRA, LoRA-XS and VeRA as a
    low-rank A', B'; IA3 as a scale vector) are held as one `SiteBank`, each row picks its slot with one
    `index_select` per bank tensor, and the update is a fixed number of ops whatever adapters are present
    (output: y * scale[slot], then baddbmm(y, bmm(x, A'[slot]), B'[slot]) over the rows, in place on y, the
    base op's fresh output that only this site reads; input: x * scale[slot], a new tensor).
    Routes that do not stack, a call that records gradients, and a large batch with few adapters run the
    loop: per adapter present, index_select of its rows, the kind's own forward, index_copy."""

    mixed_site = True   # how the fuse pass knows one (passes/_fuse_regions.mixed_site) without importing this

    def __init__(self, side: str, routes: list):
        super().__init__()
        self.side = side
        self.sources: list = [None] * len(routes)   # each route's site path (build sets them; `_retie` reads them)
        self._bank = None   # (key, LoraBank): the routes' LoRA tensors as one padded bank, for the kernels
        self._site_bank = None   # (key, SiteBank), rebuilt when a stacked tensor changed (its version counter)
        self._route(routes)

    def _route(self, routes: list) -> None:
        self.routes = routes
        forms = [_form(self.side, kind.name, params, opts, dims) for _, kind, opts, dims, params in routes]
        names = [route[0] for route in routes]
        if len(set(names)) != len(names):   # one adapter twice at an op: keep the loop, in route order
            forms = [None] * len(routes)
        self._stacked = [(route, form) for route, form in zip(routes, forms) if form is not None]
        self._looped = [route for route, form in zip(routes, forms) if form is None]
        self._names = tuple(route[0] for route, _ in self._stacked)
        self._tensors = [t for (*_, params), _ in self._stacked for t in params.values()]

    def retie(self, params: list[dict[str, torch.Tensor]]) -> None:
        """Take each route's tensors anew (`_retie`: each aliases the one it replaces, so the banks stay)."""
        new = {id(route): (*route[:4], tensors) for route, tensors in zip(self.routes, params)}
        self.routes = list(new.values())
        self._stacked = [(new[id(route)], form) for route, form in self._stacked]
        self._looped = [new[id(route)] for route in self._looped]
        self._tensors = [t for (*_, tensors), _ in self._stacked for t in tensors.values()]

    def forward(self, plan: RowPlan | None, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        base = x if self.side == "input" else y
        if plan is None or plan.whole == BASE:
            return base
        if plan.whole is None and self._kernel_device(x) and self._kernel_ready(x, y):
            return self._kernel_forward(plan, x, y)
        held = plan.gathered.get(self)
        if held is not None:   # a decode step after the first: the plan's gather, no checks (they held then)
            out, looped = self._gathered(plan, held, x, y), self._looped
        else:
            out, looped = base, self.routes
            index = self._gathers(plan, x, y) if plan.whole is None and self._stacked else None
            if index is not None:
                out, looped = self._gathered(plan, self._gather(plan, index, x), x, y), self._looped
        for name, kind, opts, dims, params in looped:
            run = kind.forward_input if self.side == "input" else kind.forward
            if plan.whole is not None:
                if plan.whole == name:   # every row: the adapter's own forward, as set_active runs it
                    return run(EagerBranch(dims), x, params, opts) if self.side == "input" else \
                        run(EagerBranch(dims), x, y, params, opts)
                continue
            rows = plan.rows(name, x.shape[0], x.device)
            if rows is None:
                continue
            x_rows = x.index_select(0, rows)
            new = run(EagerBranch(dims), x_rows, params, opts) if self.side == "input" else \
                run(EagerBranch(dims), x_rows, y.index_select(0, rows), params, opts)
            out = out.index_copy(0, rows, new.to(out.dtype))
        return out

    # the gathered path (every device; on CUDA the kernels below come first where they apply)

    def _gathers(self, plan: RowPlan, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        """Each row's slot when this call runs the gathered path (no gradient to record, one dtype, and a
        batch that is small, of long rows or of few rows per adapter present), else None."""
        if y is not None and y.dtype != x.dtype or not x.is_floating_point() or x.dim() < 2:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or (y is not None and y.requires_grad) or
                                        any(t.requires_grad for t in self._tensors)):
            return None    # the stacked bank is a detached copy: a call that records gradients keeps the loop
        slots = plan.slots(self._names, x.device)
        if slots is None:   # none of the stacked adapters in this batch
            return None
        index, present = slots
        tokens = x.numel() // max(1, x.shape[-1] * plan.batch)   # per row: x [batch, ..., K] or [batch * length, K]
        if plan.batch <= max(GATHER_MAX_ROWS, len(self._names) + 1) or tokens >= GATHER_MIN_TOKENS or \
                plan.batch <= GATHER_ROWS_PER_ADAPTER * present:
            return index
        return None

    def _gather(self, plan: RowPlan, index: torch.Tensor, x: torch.Tensor) -> tuple:
        """(the bank, each row's factors: A' then B', one gather, or None where the site has no low-rank route,
        the rows' slots `index`).
        The plan keeps them when the batch is no larger than the bank (a generate's decode steps share one plan,
        and the adapters cannot change during it): every later call of this site with the plan skips the bank's
        version check, the gather and the path's checks."""
        bank = self._stacked_bank(x)
        rows = bank.factors.index_select(0, index) if bank.a is not None else None
        held = (bank, rows, index)
        if plan.batch <= len(self._stacked) + 1:   # the bank's slots
            plan.gathered[self] = held
        return held

    def _gathered(self, plan: RowPlan, held: tuple, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The stacked routes' rows in one pass from the gathered factors (or scale rows) of `held`
        (`_gather`). An output site updates y in place: the base op's own result, which only this site reads."""
        bank, rows, index = held
        batch = plan.batch
        if x.shape[0] % batch:
            raise SurgeonError(f"mixed batch: an adapted op's input has {x.shape[0]} rows, neither the batch "
                               f"({batch}) nor a multiple of it")
        # rows first: x [batch, ..., K] as it is, or x [batch * length, K] (a flattened site) as [batch, length, K]
        x3 = x.reshape(batch, -1, x.shape[-1])
        if self.side == "input":
            return (x3 * bank.scale.index_select(0, index)[:, None, :]).view(x.shape)
        y3 = y.reshape(batch, -1, y.shape[-1])
        if bank.scale is not None:
            y3.mul_(bank.scale.index_select(0, index)[:, None, :])
        if rows is not None:   # each row's A' and B' (one tensor per slot), two batched GEMMs
            K, N, rank = x3.shape[-1], y3.shape[-1], bank.a.shape[-1]
            y3.baddbmm_(torch.bmm(x3, rows[:, :K * rank].view(batch, K, rank)),
                        rows[:, K * rank:].view(batch, rank, N))
        return y3.view(y.shape)

    def _stacked_bank(self, x: torch.Tensor) -> SiteBank:
        try:   # a tensor's version only grows: their sum changes when any of them was updated in place
            key = (x.dtype, x.device, sum(map(_VERSION, self._tensors)))
        except RuntimeError:   # inference tensors keep no version counter: rebuilt on every call
            key = None
        if self._site_bank is None or key is None or self._site_bank[0] != key:
            self._site_bank = (key, self._build_bank(x.dtype, x.device))
        return self._site_bank[1]

    def _build_bank(self, dtype: torch.dtype, device: torch.device) -> SiteBank:
        """Stack the routes once per change: the factors made in float64 from the kind's tensors, then cast."""
        n = len(self._stacked)
        K, N = self._stacked[0][0][3]
        lowrank, scales = [], []
        for slot, ((name, kind, opts, dims, params), form) in enumerate(self._stacked, 1):
            if form == "lowrank":
                lowrank.append((slot, *_factors(kind.name, params, opts, dims)))
            else:
                scales.append((slot, params["ia3_l"].detach()))
        factors = a = b = scale = None
        with torch.no_grad():
            if lowrank:   # A' and B' of a slot side by side in one row of `factors`: one gather per call
                r_max = max(factor_a.shape[0] for _, factor_a, _ in lowrank)
                factors = torch.zeros((n + 1, r_max * (K + N)), dtype=dtype, device=device)
                a = factors[:, :K * r_max].view(n + 1, K, r_max)
                b = factors[:, K * r_max:].view(n + 1, r_max, N)
                for slot, factor_a, factor_b in lowrank:
                    rank = factor_a.shape[0]
                    a[slot, :, :rank] = factor_a.t().to(device=device, dtype=dtype)
                    b[slot, :rank] = factor_b.t().to(device=device, dtype=dtype)
            if scales:
                scale = torch.ones((n + 1, N if self.side == "output" else K), dtype=dtype, device=device)
                for slot, vector in scales:
                    scale[slot] = vector.to(device=device, dtype=dtype)
        return SiteBank(factors, a, b, scale)

    # the CUDA path: a batch of several adapters at an output site whose routes are all plain LoRA runs the
    # mixed-batch kernels (kernels/mixed_lora.py: BGMV for decode-sized row counts, SGMV above) on a bank
    # built from the routes' tensors once, and again only when one of them changed (its version counter)

    @staticmethod
    def _kernel_device(x: torch.Tensor) -> bool:
        """Whether this call may run the kernels: CUDA tensors (CPU calls keep the torch path above)."""
        return x.is_cuda

    def _kernel_ready(self, x: torch.Tensor, y: torch.Tensor | None) -> bool:
        from .adapters.lora import LORA
        from .kernels.dispatch import KERNEL_DTYPES

        if self.side != "output" or y is None or x.dim() < 2 or x.dtype != y.dtype or x.dtype not in KERNEL_DTYPES:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or any(
                t.requires_grad for *_, params in self.routes for t in params.values())):
            return False    # the kernels have no backward: a call that records gradients keeps the torch path
        for _, kind, opts, _, params in self.routes:
            a, b = params.get("lora_A"), params.get("lora_B")
            if kind is not LORA or set(params) != {"lora_A", "lora_B"} or "experts" in opts or \
                    opts.get("groups", 1) != 1 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] or \
                    b.shape != (y.shape[-1], a.shape[0]) or a.device != x.device or b.device != x.device:
                return False
        return True

    def _kernel_bank(self, x: torch.Tensor):
        from .adapters.lora import lora_scale
        from .kernels.mixed_lora import LoraBank

        tensors = [(params["lora_A"], params["lora_B"]) for _, _, _, _, params in self.routes]
        try:
            key = (x.dtype, x.device, tuple((id(t), t._version) for pair in tensors for t in pair))
        except RuntimeError:   # inference tensors keep no version counter: rebuilt on every call
            key = None
        if self._bank is None or key is None or self._bank[0] != key:
            bank = LoraBank.build([(a.detach(), b.detach(), lora_scale(opts))
                                   for (a, b), (_, _, opts, _, _) in zip(tensors, self.routes)],
                                  dtype=x.dtype, device=x.device)
            self._bank = (key, bank)
        return self._bank[1]

    def _kernel_forward(self, plan: RowPlan, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + s B A x per row, by the kernels: each row's adapter index in the bank (-1: none; a loop over
        the routes, not the rows), repeated over the tokens of a row when x keeps the batch dim."""
        from .kernels.mixed_lora import mixed_lora

        with torch.no_grad():
            return mixed_lora(x, y, self._kernel_bank(x), self.row_index(plan, x), check_index=False)

    def row_index(self, plan: RowPlan, x: torch.Tensor) -> torch.Tensor:
        """Each row's adapter index in the kernel bank (its place among the routes; -1: none; a loop over the
        routes, not the rows), repeated over the positions of a row when x keeps the batch dim."""
        leading = x.shape[0]
        index = torch.full((leading,), -1, dtype=torch.int32, device=x.device)
        for i, (name, *_) in enumerate(self.routes):
            rows = plan.rows(name, leading, x.device)
            if rows is not None:
                index.index_fill_(0, rows, i)
        tokens = 1
        for size in x.shape[1:-1]:
            tokens *= size
        return index.repeat_interleave(tokens) if tokens != 1 else index


# ------------------------------------------------------------------------------------ the plan

def plan_rows(adapters: dict, names: Any, batch: int) -> RowPlan:
    """Check `adapter_names` against the compile's adapters and the batch; group the rows by name."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or \
            not all(isinstance(n, str) for n in names):
        raise SurgeonError(f"adapter_names must be a list of adapter names, one per row (PEFT's convention, "
                           f"'{BASE}' for none), got {names!r}"[:300])
    if len(names) != batch:
        raise SurgeonError(f"adapter_names has {len(names)} names but the batch has {batch} rows: give one name "
                           f"per row ('{BASE}' for a row without an adapter)")
    check_states(adapters, set(names) - {BASE})
    groups, order = {}, {}
    for row, name in enumerate(names):
        order.setdefault(name, []).append(row)
    for name, rows in order.items():
        if name != BASE:
            groups[name] = torch.tensor(rows, dtype=torch.long)
    whole = names[0] if len(order) == 1 else None
    return RowPlan(batch, groups, whole, list(names))


def check_states(adapters: dict, wanted: set[str]) -> None:
    """Refuse names that are unknown or cannot join, and any adapter baked into the base graph."""
    mixable = sorted(n for n, s in adapters.items() if not refusal(s))
    for name in sorted(wanted):
        if name not in adapters:
            raise SurgeonError(f"adapter_names: no adapter named '{name}'; known: {[BASE, *mixable]}"
                               + (f" (and, not usable in a mixed batch: {sorted(set(adapters) - set(mixable))})"
                                  if set(adapters) - set(mixable) else ""))
        why = refusal(adapters[name])
        if why:
            state = adapters[name]
            raise SurgeonError(f"adapter_names: adapter '{name}' ({state.spec.type}, {state.status}) cannot join a "
                               f"mixed batch: {why}")
    for name, state in adapters.items():
        if state.status in _BAKED or (state.status in _USABLE and any(
                s.options.get("init") in BASE_INITS for s in state.sites)):
            raise SurgeonError(f"adapter_names: adapter '{name}' ({state.spec.type}, {state.status}) "
                               f"{'changes the base graph' if state.status in _USABLE else 'is part of the graph'}: "
                               f"{refusal(state)}, so '{BASE}' rows and other adapters' rows would carry it too")


# ------------------------------------------------------------------------------------ building

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def mixed_graph(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """The mixed graph of `gm` (built on first use, rebuilt when the graph, the adapters or the placement
    changed): the same inputs, then a RowPlan.

    `set_active` detaches and attaches adapter branches, which renames their nodes: after a round trip
    (set_active("b"), then set_active("a") again) the code differs only in names. The graph's shape (`_shape`:
    its nodes with every name replaced by its position) then equals the one the mixed graph was built from,
    and the mixed graph is kept, its sites re-tied to the adapters' current tensors (`_retie`) instead of a
    rebuild (about 50 ms a graph here, plus the banks)."""
    statuses = tuple((n, s.status) for n, s in ctx.adapters.items())
    key = (gm.code, placement(gm), statuses)
    held = _CACHE.get(gm)
    if held is not None and held[0] == key:
        return held[1]
    shape = (_shape(gm), key[1], statuses)
    if held is not None and held[2] == shape and _retie(held[1], gm, ctx, *key[1]):
        _CACHE[gm] = (key, held[1], shape)
        return held[1]
    mixed = build(gm, ctx)
    if lowers(key[1][0]):
        mixed = _lowered(mixed, gm, ctx)
    _CACHE[gm] = (key, mixed, shape)
    return mixed


def lowers(device: torch.device) -> bool:
    """Whether a mixed graph placed on `device` gets its `mixed_lora_linear` regions lowered: where the
    mixed-batch kernels run (CUDA, with Triton), so each plain-LoRA site and the pointwise ops after it
    (activation, gate multiply, residual add) become one base GEMM, one shrink and one expand kernel with
    the epilogue fused. On a CPU the stacked torch path above is faster than the regions' reference path."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _lowered(mixed: fx.GraphModule, gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """`mixed` with its mixed_lora_linear regions lowered (passes/lower.py; its other pointwise groups are left
    as they are); the unlowered graph, built again, where lowering refuses (a SurgeonError), with a warning that
    says why (the mixed batch still runs, on the stacked torch path)."""
    from .fastpath import recompile
    from .passes.lower import Lower

    try:
        Lower(elementwise=False).run(mixed, ctx)
    except SurgeonError as error:
        warnings.warn(f"mixed batch: the mixed-batch LoRA regions were not lowered to kernels ({error}); the "
                      "unlowered mixed graph runs instead", stacklevel=2)
        return build(gm, ctx)
    recompile(mixed)
    return mixed


class _At:
    """A node's position in its graph, standing for the node in `_shape` (its repr is the position)."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"


def _shape(gm: fx.GraphModule) -> tuple:
    """The graph with its node names left out: per node (op, target, its arguments with each node given by its
    position). Two graphs of one shape compute the same from the same tensors."""
    at: dict[fx.Node, _At] = {}
    rows = []
    for index, node in enumerate(gm.graph.nodes):
        at[node] = _At(index)
        args = fx.node.map_arg((node.args, node.kwargs), at.__getitem__)
        rows.append((node.op, node.target if isinstance(node.target, str) else id(node.target), repr(args)))
    return tuple(rows)


def _aliases(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether `new` is `old`, or the same memory seen the same way at the same version (set_active re-registers
    an adapter's tensors as new Parameters over the same storage, sharing the version counter)."""
    if new is old:
        return True
    try:
        return (new.data_ptr() == old.data_ptr() and new.shape == old.shape and new.stride() == old.stride() and
                new.dtype == old.dtype and new.device == old.device and new._version == old._version)
    except RuntimeError:   # inference tensors keep no version counter: never taken as the same
        return False


def _retie(mixed: fx.GraphModule, gm: fx.GraphModule, ctx, device, dtype) -> bool:
    """Point the mixed graph's sites at the adapters' current tensors when each aliases the one the site holds
    (so the sites' banks stay valid) and every tensor the mixed graph reads is still the module's (a merge and
    unmerge may put new base weights in); False, changing nothing, otherwise (then the caller rebuilds)."""
    for node in mixed.graph.find_nodes(op="get_attr"):   # the base graph's tensors: still the module's own objects
        try:
            if operator.attrgetter(node.target)(mixed) is not operator.attrgetter(node.target)(gm):
                return False
        except AttributeError:
            return False
    tensors = _route_tensors(gm, ctx, device, dtype)
    sites = [m for m in mixed.modules() if isinstance(m, MixedSite)]
    for site in sites:
        for (name, *_, params), path in zip(site.routes, site.sources):
            new = tensors.get(name, {}).get(path)
            if new is None or set(new) != set(params) or not all(_aliases(new[p], params[p]) for p in params):
                return False
    for site in sites:
        site.retie([tensors[name][path] for (name, *_), path in zip(site.routes, site.sources)])
    return True


def _route_tensors(gm: fx.GraphModule, ctx, device, dtype) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{adapter: {site path: {parameter: tensor}}} of the adapters that can join: an attached one's tensors in
    `gm`, a parked one's placed like the graph."""
    tensors = {}
    for name, state in ctx.adapters.items():
        if state.status in _USABLE and not refusal(state):
            tensors[name] = {site.path: ({p: get_tensor(gm, t) for p, t in site.params.items()}
                                         if state.status in _ATTACHED else
                                         {p: _place(t, device, dtype) for p, t in site.parked.items()})
                             for site in state.sites}
    return tensors


def build(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    from .adapter_ops import _site_input, detach, site_calls
    from .fastpath import recompile

    graph = fx.Graph()   # plain codegen: flat inputs (then the plan), flat outputs (`run` restores the structure)
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    mixed = fx.GraphModule(gm, graph, class_name=f"Mixed{type(gm).__name__}")
    device, dtype = placement(gm)
    tensors = _route_tensors(gm, ctx, device, dtype)   # taken before detaching deletes them from the copy
    for state in reversed([s for s in ctx.adapters.values() if s.status in _ATTACHED]):
        for site in reversed(state.sites):
            detach(mixed, copy.copy(site))
    placeholders = list(mixed.graph.find_nodes(op="placeholder"))
    with mixed.graph.inserting_after(placeholders[-1]):
        plan = mixed.graph.placeholder("adapter_plan", default_value=None)
    by_call: dict[fx.Node, dict[str, list]] = {}
    for name, state in ctx.adapters.items():
        if name not in tensors:
            continue
        for site in state.sites:
            dims = (site.in_features, site.out_features)
            for call in site_calls(mixed, site):
                for side in _HALVES[state.spec.type](site.options):
                    route = (name, state.spec.kind, dict(site.options), dims, tensors[name][site.path])
                    by_call.setdefault(call, {}).setdefault(side, []).append((route, site.path))
    for index, (call, sides) in enumerate(by_call.items()):
        op = "addmm" if call.target is torch.ops.aten.addmm.default else "linear"
        x = _site_input(call, op)
        if "input" in sides:
            target = f"_mixed_in_{index}"
            mixed.add_module(target, _site("input", sides["input"]))
            with mixed.graph.inserting_before(call):
                new_x = mixed.graph.call_module(target, (plan, x))
            call.replace_input_with(x, new_x)
        if "output" in sides:
            target = f"_mixed_out_{index}"
            mixed.add_module(target, _site("output", sides["output"]))
            with mixed.graph.inserting_after(call):
                new_y = mixed.graph.call_module(target, (plan, _site_input(call, op), call))
            call.replace_all_uses_with(new_y, delete_user_cb=lambda user, new_y=new_y: user is not new_y)
    mixed.graph.lint()
    recompile(mixed)
    mixed.eval()
    return mixed


def _site(side: str, entries: list) -> MixedSite:
    site = MixedSite(side, [route for route, _ in entries])
    site.sources = [path for _, path in entries]
    return site


def _place(tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


# ------------------------------------------------------------------------------------ calling

class Serving:
    """What a compiled module keeps for mixed calls: the compile's adapter states (gm.meta["surgeon_serving"])."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __deepcopy__(self, memo):
        return Serving(copy.deepcopy(self.ctx, memo))

    def call(self, module: nn.Module, names: Any, args: tuple, kwargs: dict) -> Any:
        return mixed_call(module, names, args, kwargs)


def batch_of(values: tuple) -> int:
    """The batch size of a call: the first tensor input's leading dimension."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise InputError("adapter_names: the call has no tensor input to take the batch size from")


def serving_ctx(module: nn.Module):
    serving = getattr(module, "meta", {}).get("surgeon_serving")
    if serving is None:
        raise SurgeonError(f"{type(module).__name__} takes no adapter_names: compile the model with surgeon.compile")
    return serving.ctx


def refuse_training(module: nn.Module) -> None:
    if module.training:
        raise SurgeonError("adapter_names: a mixed batch runs in eval mode only (as PEFT's); call .eval() first")


def mixed_call(module: nn.Module, names: Any, args: tuple, kwargs: dict) -> Any:
    """`module(*args, **kwargs)` with one adapter per row (SurgeonModule.__call__ with adapter_names)."""
    ctx = serving_ctx(module)
    refuse_training(module)
    inputs = module.meta.get("surgeon_inputs")
    values = inputs.bind(args, kwargs) if inputs is not None else tuple(args) + tuple(kwargs.values())
    plan = plan_rows(ctx.adapters, names, batch_of(values))
    return run(module, mixed_graph(module, ctx), values, plan)


def run(gm: fx.GraphModule, mixed: fx.GraphModule, values: tuple, plan: RowPlan) -> Any:
    """The mixed graph on the graph's flat inputs and a plan; outputs in the structure `gm` returns them."""
    out = mixed(*values, plan)
    codegen = getattr(gm.graph, "_codegen", None)
    return codegen.process_outputs(out) if codegen is not None else out


# ------------------------------------------------------------------------------------ the run-time bank

def load_adapter(compiled, path, name: str, active: bool = False, validate=None) -> None:
    """Insert the adapter saved in folder `path` (surgeon's or PEFT's) into a compiled model under `name`,
    without recapture: the spec gains the adapter, the insert pass runs on the module (and on the generation
    graphs), and unless `active` it is parked at once (PEFT's load_adapter: loaded, not switched on), so
    plain calls compute what they did; rows name it through adapter_names. Refused before anything changes:
    a taken or malformed name, a folder that does not load, a kind that cannot join a mixed batch, targets
    that match no module (`validate(spec, model)`: surgeon.compiled's check of a spec against the model);
    a failed insertion leaves the module as it was."""
    import dataclasses
    import json
    from pathlib import Path

    from .errors import SpecError
    from .pipeline import AdapterState
    from .spec import _adapter

    ctx = compiled.ctx
    if not isinstance(name, str) or not name.isidentifier() or name == BASE:
        raise SpecError("load_adapter", f"the name must be an identifier other than '{BASE}', got {name!r}")
    if name in ctx.adapters:
        raise SpecError("load_adapter", f"an adapter named '{name}' is already in this compile "
                                        f"({ctx.adapters[name].status}): choose another name")
    folder = Path(path)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    key = "from_peft" if isinstance(config, dict) and "peft_type" in config else "from_dir"
    shell = dataclasses.replace(ctx.spec, adapters=())
    adapter = _adapter(shell, len(ctx.spec.adapters), {"name": name, key: str(folder)})
    if adapter.type not in _HALVES:
        raise SpecError("load_adapter", f"adapter '{name}' from {folder} is a '{adapter.type}' adapter, which cannot "
                                        f"join a mixed batch ({refusal(AdapterState(adapter, status='inserted'))}); "
                                        "give it in the compile's spec instead")
    if compiled.original is not None and validate is not None:
        validate(dataclasses.replace(shell, adapters=(adapter,)), compiled.original)
    before_spec, actives = ctx.spec, [n for n, s in ctx.adapters.items() if s.status == "inserted"]
    ctx.spec = dataclasses.replace(ctx.spec, adapters=ctx.spec.adapters + (adapter,))
    ctx.adapters[name] = AdapterState(adapter)
    generator = compiled.generator
    for graph in (generator.graphs or {}).values() if generator is not None else ():
        graph.ctx.spec, graph.ctx.adapters[name] = ctx.spec, AdapterState(adapter)
    try:
        compiled.apply([{"insert": {"adapters": [name]}}], verify=False)
    except BaseException:
        state = ctx.adapters.pop(name)
        from .adapter_ops import detach

        for site in state.sites if state.status == "inserted" else ():
            detach(compiled.module, site)
        ctx.spec = before_spec
        if generator is not None:
            generator.invalidate()
        raise
    state = ctx.adapters[name]
    why = refusal(state)
    if why:   # a site it cannot join at (a conv, an expert stack): taken back out
        unload_adapter(compiled, name)
        raise SpecError("load_adapter", f"adapter '{name}' from {folder} cannot join a mixed batch: {why}; it was "
                                        "removed again")
    if not active:
        compiled.set_active(*actives)


def unload_adapter(compiled, name: str) -> None:
    """Take an adapter out of a compiled model (its branch and parameters), without recapture. Its record stays,
    as "removed" (the passes that ran keep naming it), so its name is not taken again."""
    from .errors import SpecError

    state = compiled._state(name)
    if state.status == "inactive":   # parked: attach it again so that the remove pass (and its replay) takes it
        compiled.set_active(*[n for n, s in compiled.ctx.adapters.items() if s.status == "inserted"], name)
    elif state.status != "inserted":
        raise SpecError("unload_adapter", f"adapter '{name}' is {state.status}: only an inserted or inactive adapter "
                                          "can be unloaded (unmerge a merged one first)")
    compiled.apply([{"remove": {"adapters": [name]}}], verify=False)


def adapter_bytes(compiled) -> dict[str, int]:
    """Bytes each adapter holds now: its parameters in the graph (inserted), parked (inactive) or kept beside
    the merged weights (merged); 0 for one removed or not inserted."""
    sizes = {}
    for name, state in compiled.ctx.adapters.items():
        held = {}   # a tensor several sites share (VeRA's projections, VB-LoRA's bank) counts once
        for site in state.sites:
            tensors = site.merged or site.parked or ({p: get_tensor(compiled.module, t) for p, t in site.params.items()}
                                                     if state.status == "inserted" else {})
            held.update({(id(t) if t.is_meta else t.data_ptr(), t.shape, t.dtype): t.numel() * t.element_size()
                         for t in tensors.values()})
        sizes[name] = sum(held.values())
    return sizes


__all__ = ["BASE", "GATHER_MAX_ROWS", "GATHER_MIN_TOKENS", "GATHER_ROWS_PER_ADAPTER", "RowPlan", "MixedSite", "SiteBank", "Serving", "plan_rows", "check_states", "mixed_graph", "mixed_call",
           "refusal", "load_adapter", "unload_adapter", "adapter_bytes"]
