"""Adapter kinds as data: each kind is one small file declaring an AdapterKind.

An AdapterKind says which options it takes, how its parameters are initialized for a site
with `in_features -> out_features` (seeing the site's base weight, for SVD-based inits), its
forward as graph code, its delta weight where a merge is exact, and its parameter count. The
forward has two optional halves: `forward_input` rewrites the site's input before the base op
(orthogonal rotations, input scaling), `forward` rewrites the base output after it (additive
low-rank updates, output scaling). The insert/merge/unmerge passes serve every kind through this
interface; adding a kind never touches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx

from ..graph import call
from ..modes import ensure_mode, read_flag

aten = torch.ops.aten


@dataclass(frozen=True)
class Option:
    type: type | tuple[type, ...]
    default: Any
    choices: tuple | None = None
    positive: bool = False
    bounds: tuple[float, float] | None = None   # inclusive range of a number (a dropout p: [0, 1])


class ConvGeometry(NamedTuple):
    """How a conv site (aten.conv1d / conv2d / conv3d) applies its weight, defaults filled in.

    `channels` counts every input channel (in_channels, not in_channels / groups): an adapter's
    kernel-sized matrix spans all of them. `padding` is a per-axis list, or the string ("same",
    "valid") of the `.padding` overloads, which an adapter conv repeats so its output lines up
    with the site's for any kernel (even kernels pad unevenly under "same").
    """

    channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1


_CONV_BY_DIMS = {1: (aten.conv1d.default, aten.conv1d.padding), 2: (aten.conv2d.default, aten.conv2d.padding),
                 3: (aten.conv3d.default, aten.conv3d.padding)}


class Branch:
    """Builds an adapter's forward in the graph: each call makes one provenance-stamped node.

    `weight` and `bias` are the site's base weight and bias nodes (bias may be None); the weight
    is stored out x in for `aten.linear` and in x out (`transposed`) for GPT-2 Conv1D's addmm.
    `in_features` and `out_features` are the site's sizes. On a conv site (1-, 2- or 3-d) `conv`
    is its ConvGeometry and in_features is in_channels * prod(kernel): the conv is a linear map
    over kernel patches, so kinds keep working on out x in matrices.
    """

    def __init__(self, graph: fx.Graph, made_by: str, path: str, adapter: str,
                 weight: fx.Node | None = None, bias: fx.Node | None = None, transposed: bool = False,
                 dims: tuple[int, int] = (0, 0), conv: ConvGeometry | None = None):
        self.graph, self.made_by, self.path, self.adapter = graph, made_by, path, adapter
        self.weight, self.bias, self.transposed = weight, bias, transposed
        self.in_features, self.out_features = dims
        self.conv_geometry = conv
        self.created: list[fx.Node] = []
        self._training: fx.Node | None = None

    def op(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = call(self.graph, target, args, kwargs, made_by=self.made_by, path=self.path, adapter=self.adapter)
        self.created.append(node)
        return node

    def linear(self, x: fx.Node, weight: fx.Node) -> fx.Node:
        return self.op(aten.linear.default, x, weight)

    @property
    def conv_groups(self) -> int:
        """The site conv's groups (1 on a linear site or an ungrouped conv)."""
        return self.conv_geometry.groups if self.conv_geometry is not None else 1

    def conv(self, x: fx.Node, weight: fx.Node, pointwise: bool = False, groups: int = 1) -> fx.Node:
        """x through a rows x cols `weight` as a conv of the site's dimensionality: with the site's
        kernel, stride, padding and dilation over all input channels (cols = in_channels * prod(kernel)),
        or as a 1x1 conv over cols * groups channels when `pointwise` (`groups` > 1: output block g
        reads only input block g, as a grouped conv does)."""
        channels, kernel, stride, padding, dilation, _ = self.conv_geometry
        plain, by_string = _CONV_BY_DIMS[len(kernel)]
        if pointwise:
            kernel_weight = weight
            for _ in kernel:
                kernel_weight = self.op(aten.unsqueeze.default, kernel_weight, -1)
            if groups == 1:
                return self.op(plain, x, kernel_weight)
            ones = [1] * len(kernel)
            return self.op(plain, x, kernel_weight, None, ones, [0] * len(kernel), ones, groups)
        kernel_weight = self.op(aten.view.default, weight, [-1, channels, *kernel])
        target = by_string if isinstance(padding, str) else plain
        pad = padding if isinstance(padding, str) else list(padding)
        return self.op(target, x, kernel_weight, None, list(stride), pad, list(dilation))

    def site_map(self, x: fx.Node, weight: fx.Node) -> fx.Node:
        """x through a rows x in_features matrix the way the site applies its own weight (linear or
        conv; on a grouped conv the matrix spans every input channel, so this conv is ungrouped)."""
        return self.conv(x, weight) if self.conv_geometry is not None else self.linear(x, weight)

    def channel_map(self, h: fx.Node, weight: fx.Node, groups: int = 1) -> fx.Node:
        """A rows x cols matrix applied at every position of h (linear, or a 1x1 conv on a conv site;
        with `groups` a grouped 1x1 conv: rows / groups outputs per block of cols inputs)."""
        if self.conv_geometry is None:
            return self.linear(h, weight)
        return self.conv(h, weight, pointwise=True, groups=groups)

    def add(self, a: Any, b: Any, alpha: float = 1) -> fx.Node:
        return self.op(aten.add.Tensor, a, b, alpha=alpha) if alpha != 1 else self.op(aten.add.Tensor, a, b)

    def mul(self, a: Any, b: Any) -> fx.Node:
        return self.op(aten.mul.Tensor, a, b)

    def mm(self, a: fx.Node, b: fx.Node) -> fx.Node:
        return self.op(aten.mm.default, a, b)

    def base_weight(self) -> fx.Node:
        """The site's base weight as an out x in node (a transpose for Conv1D sites)."""
        return self.op(aten.t.default, self.weight) if self.transposed else self.weight

    def training(self) -> fx.Node:
        """The compiled module's training flag, read when it runs (surgeon.modes: `.train()` / `.eval()`)."""
        if self._training is None:
            if self.graph.owning_module is not None:
                ensure_mode(self.graph.owning_module)
            self._training = read_flag(self.graph, self.made_by, self.adapter)
            self.created.append(self._training)
        return self._training

    def dropout(self, x: fx.Node, p: float) -> fx.Node:
        """PEFT's adapter dropout: dropout(x, p) in train mode, x in eval (so a merge stays exact);
        x itself, and no node, when p is 0."""
        if not p:
            return x
        node = self.op(aten.dropout.default, x, float(p), self.training())
        if isinstance(x, fx.Node) and "val" in x.meta:
            node.meta["val"] = x.meta["val"]   # eval's dropout returns x; the flag is no tensor for fill_meta
        return node

    def when_training(self, helper: Callable, *args: Any, like: fx.Node | None = None) -> fx.Node:
        """A call of a surgeon.modes run-time helper, the training flag first; its meta["val"] is `like`'s."""
        node = self.op(helper, self.training(), *args)
        if isinstance(like, fx.Node) and "val" in like.meta:
            node.meta["val"] = like.meta["val"]
        return node


class EagerBranch(Branch):
    """Runs a kind's graph code at once on tensors, e.g. to build the exact matrix a merge needs."""

    def __init__(self, dims: tuple[int, int], weight: torch.Tensor | None = None):
        super().__init__(None, "", "", "", weight, None, False, dims)

    def op(self, target: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return target(*args, **kwargs)

    def training(self) -> bool:
        return False   # eager runs build merge matrices: eval semantics (a dropout is the identity)


def input_map(forward_input: Callable, params: dict[str, torch.Tensor], opts: dict, in_features: int,
              out_features: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The in x in matrix M with forward_input(x) == x @ M, in `dtype` (run on the identity; a merge
    passes merge_dtype(weight))."""
    params = {name: tensor.to(dtype) for name, tensor in params.items()}
    eye = torch.eye(in_features, dtype=dtype, device=next(iter(params.values())).device)
    return forward_input(EagerBranch((in_features, out_features)), eye, params, opts)


def merge_dtype(weight: torch.Tensor | None) -> torch.dtype:
    """The dtype a kind builds its delta weight in for a merge into `weight`: float64 for a float64
    weight, float32 for any other (float32 holds a bf16 or fp16 weight exactly, and its rounding of
    the delta is far below the rounding of W + dW to a bf16 or fp16 weight's dtype); float64 when no
    weight is given (a delta that does not depend on it, asked for on its own)."""
    return torch.float64 if weight is None or weight.dtype == torch.float64 else torch.float32


# elements per piece of merged_weight's add: a 128 KiB float32 buffer, reused, so the widened weight never
# exists as a whole (one mixed-dtype torch.add runs ~5x slower than these three passes), and no more than
# ATen's grain size, so each op runs on the calling thread: no hand-off between threads per piece, which
# on a busy 2-core machine cost milliseconds each
MERGE_PIECE = 1 << 15


def merged_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + dW rounded to W's dtype, as a new contiguous tensor: what the merge pass (adapter_ops.add_delta)
    and surgeon.merge_checkpoint write, so the two agree bit for bit.

    The sum is computed in the wider of the two dtypes (float32 for a bf16, fp16 or fp32 W and a float32
    dW; W is exact in it) and rounded to W's dtype once it is formed, a cache-sized piece at a time, so
    no widened copy of W is ever whole. That is bit for bit (W.double() + dW.double()).to(W.dtype), the
    rule before float32 deltas, whose float64 copies of W and dW were up to 8x a bf16 weight's size:
    torch casts float64 to bf16 and fp16 through float32, and rounding the sum of two float32 values to
    float64 first never changes its float32 rounding (53 >= 2 x 24 + 2).
    """
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"a delta of shape {list(delta.shape)} cannot merge into a weight of shape "
                         f"{list(weight.shape)}")
    weight, delta = weight.detach(), delta.detach().to(weight.device)
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):   # float8: no add
        return (weight.double() + delta.double()).to(weight.dtype).contiguous()
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    wide = torch.promote_types(weight.dtype, delta.dtype)
    if wide == weight.dtype == delta.dtype or weight.device.type != "cpu" or weight.numel() <= MERGE_PIECE:
        torch.add(weight, delta, out=out)   # one op: no temporary, or too small to matter
        return out
    target = out
    if weight.is_contiguous() and delta.is_contiguous():   # flat pieces
        weight, delta, target = weight.reshape(-1), delta.reshape(-1), out.view(-1)
    step = max(1, MERGE_PIECE // max(1, weight[0].numel()))   # else whole rows of the first dimension
    buffer = torch.empty((min(step, weight.shape[0]), *weight.shape[1:]), dtype=wide, device=weight.device)
    for start in range(0, weight.shape[0], step):
        rows = min(step, weight.shape[0] - start)
        piece = buffer[:rows]
        piece.copy_(weight[start:start + rows])   # exact: W widens without rounding
        piece.add_(delta[start:start + rows])     # the sum, rounded to the wide dtype
        target[start:start + rows].copy_(piece)   # ... and to W's
    return out


ParamDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterKind:
    """One adapter method. Weights passed to the callables are out x in, on the site's device.

    init(opts, in_features, out_features, dtype, generator, weight) -> parameters
    forward(branch, x, y, params, opts) -> adapted output; forward_input(branch, x, params, opts)
        -> adapted input; at least one of the two is given
    delta_weight(params, opts, weight) -> W' - W for the merge (weight: the base weight it lands on),
        built once in merge_dtype(weight): float32, or float64 for a float64 weight (never a float64
        copy of a bf16/fp16/fp32 weight); the merge adds it with merged_weight (one rounding to the
        weight's dtype). It may be a parameter itself (delta's D): callers never write into it
    undo_delta(params, opts, merged_weight) -> W - W' for unmerge, in merge_dtype(merged_weight) too;
        when None, the delta does not depend on the weight and unmerge subtracts delta_weight
    bias_map(params, opts, bias, undo) -> the bias after the merge (undo: before it, from the merged
        one), given and returned in float64, for kinds that transform the base output (IA3's output
        scale: l b; RoAd's rotation: R b); None for no change
    base_delta(init_params, opts, weight) -> change written into the base weight at insertion, or
        None (PiSSA keeps the residual W - s B0 A0 in the base; recomputed for loaded adapters)
    frozen / shared: parameters that take no gradient; shared ones are stored once per adapter
        and shape and read by every site of that shape (VeRA's random projections)
    shared_trained: the shared parameters that do train (VB-LoRA's vector bank, Uni-LoRA's vector):
        one nn.Parameter that every site reading it feeds gradients into, counted once (shared_count),
        saved once. A fresh insert keeps the first site's init of it (graph order); a loaded adapter's
        sites must all hold the same tensor
    shared_group(opts) -> which copy of the shared parameters a site reads, beside their shape (TinyLoRA's
        weight-tying group); None: one copy per shape
    shared_count(opts) -> trained parameters in one copy of shared_trained, added to the adapter's count
        once per copy (param_count counts a site's own parameters only)
    site_layout(opts, sites) -> per-site options that depend on where a site stands among all the
        adapter's sites: `sites` is [(path, in_features, out_features)] in module order (the order the
        model registers the site weights, PEFT's order), the result one dict per site (TinyLoRA's layer
        index and tying group, Uni-LoRA's slice of one index stream). Loaded site options win over it
    recomputed: frozen parameters init computes from the site's base weight that a PEFT checkpoint
        does not hold (PSOFT's SVD factors A and B, OSF's frozen subspace): a loaded adapter lacking
        them gets init's, from the weight it is inserted on, as PEFT rebuilds them when it loads
    init_check(opts): "exact" when the init is the identity bit for bit, "close" when it is the
        identity up to rounding, "none" when it changes the function (e.g. HRA with an odd rank)
    merge_refusal(opts) -> why these options cannot merge, "" when they can (a parallel adapter
        merges only without a nonlinearity); read through `refusal(opts)`
    site_options(gm, path, weight_target, opts) -> options for one site, read from the graph
        before its parameters are made and merged over `opts` (S2FT's column count comes from
        the co-permute record)
    site_ops: the base ops a kind attaches to; a call site ("sdpa", adapter_ops.CALL_SITE_OPS) has
        no weight: its dims are the key's (heads, head_dim), and forward_input gets the call and
        returns the arguments it changes by rules.SIGNATURES name (prefix tuning);
        a kind that lists a conv ("conv2d"; "conv1d", "conv3d" and the string-padding overloads
        "conv2d.padding" ...) builds its forward with Branch.site_map / channel_map and sees a
        conv's weight as out x (in * prod(kernel))
    conv_groups(opts, groups) -> why this kind cannot attach to a conv with `groups` > 1 ("" when
        it can); None refuses every grouped conv. A kind that takes them sees in_features as all
        input channels times the kernel and reads `branch.conv_groups` (LoRA's grouped 1x1 B)
    rank_limit(opts, in_features, out_features) -> (the largest rank a site of these sizes takes,
        the rule as words for the error) or None where the kind takes any rank; read before capture
        from the module's weight, so a spec whose rank cannot fit is refused with the rule (default:
        min(in, out), a rank-r factorization's own limit; PEFT's limits where it has the kind)
    param_refusal(opts) -> why these options cannot adapt a 3-D parameter site ("param" in
        site_ops: fused MoE experts, E x out x in), "" when they can. On such a site the forward
        gets x=None and y = the weight's get_attr node, returns the weight to use in its place
        (W + delta: every op that reads the weight sees it), and the delta is E x out x in
    index_bounds(opts, in_features, out_features) -> {integer parameter: the exclusive upper bound of its
        values, one per row of a 2 x k (row, column) pair tensor, or one for a flat one}: a loaded adapter's
        indices are checked against them (`index_misfit`) before any graph change (SHiRA's, RoSA's support)
    calibrated(opts) -> which statistic of the site's inputs init needs, or False: "covariance" (CorDA's
        normalized X^T X) or "scatter" (EVA's centered one); insert runs the graph on the compile's example
        inputs (surgeon.calibration) and calls init with `covariance=` (in x in, float32); "gradient" (LoRA-GA,
        LoRA-SB): `covariance=` is the next-token loss gradient of the site's weight, out x in
        (surgeon.grad_calibration); callers that have no inputs (a checkpoint merge) call init without it
    rotation(params, opts, weight) -> the merge as a rotation of the input, rotations.Rotation(R, s)
        with W' = diag(s) W R (R orthogonal, float64), or a string saying why it is none (a reflection,
        det -1, has no real logarithm); None for kinds that are no rotation. `combine`'s orthomerge
        merges these in the Lie algebra and splits every other kind by Procrustes
    """

    name: str
    options: dict[str, Option]
    init: Callable[..., ParamDict]
    forward: Callable[[Branch, fx.Node, fx.Node, dict[str, fx.Node], dict], fx.Node] | None
    delta_weight: Callable[[ParamDict, dict, torch.Tensor], torch.Tensor] | None
    param_count: Callable[[dict, int, int], int]
    refuse_merge: str = ""   # why merge is impossible, when delta_weight is None
    forward_input: Callable[[Branch, fx.Node, dict[str, fx.Node], dict], fx.Node] | None = None
    undo_delta: Callable[[ParamDict, dict, torch.Tensor], torch.Tensor] | None = None
    refuse_unmerge: str = ""   # why unmerge is impossible (the merged weight lost what it needs)
    bias_map: Callable[[ParamDict, dict, torch.Tensor, bool], torch.Tensor | None] | None = None
    base_delta: Callable[[ParamDict, dict, torch.Tensor], torch.Tensor | None] | None = None
    frozen: frozenset[str] = frozenset()
    shared: frozenset[str] = frozenset()
    shared_trained: frozenset[str] = frozenset()
    shared_group: Callable[[dict], Any] | None = None
    shared_count: Callable[[dict], int] | None = None
    site_layout: Callable[[dict, list[tuple[str, int, int]]], list[dict]] | None = None
    recomputed: frozenset[str] = frozenset()
    init_check: Callable[[dict], str] = lambda opts: "exact"
    merge_refusal: Callable[[dict], str] | None = None
    site_options: Callable[[fx.GraphModule, str, str, dict], dict] | None = None
    site_ops: tuple[str, ...] = ("linear", "addmm")   # the base ops it attaches to (rules.SIGNATURES names)
    conv_groups: Callable[[dict, int], str] | None = None
    param_refusal: Callable[[dict], str] | None = None
    rank_limit: Callable[[dict, int, int], tuple[int, str] | None] = \
        lambda opts, fan_in, fan_out: (min(fan_in, fan_out), "min(in, out)")
    rotation: Callable[[ParamDict, dict, torch.Tensor], Any] | None = None
    calibrated: Callable[[dict], str | bool] | None = None
    index_bounds: Callable[[dict, int, int], dict[str, tuple[int, ...]]] | None = None

    @property
    def untrained(self) -> frozenset[str]:
        """The parameters that take no gradient: frozen ones and shared ones that are not trained."""
        return self.frozen | (self.shared - self.shared_trained)

    def refusal(self, opts: dict) -> str:
        """Why an adapter of this kind with these options cannot be merged; "" when it can."""
        if self.delta_weight is None:
            return self.refuse_merge
        return self.merge_refusal(opts) if self.merge_refusal is not None else ""


def index_misfit(kind: AdapterKind, opts: dict, in_features: int, out_features: int,
                 tensors: dict[str, torch.Tensor]) -> str:
    """What is wrong with the integer indices of a loaded site's tensors (outside the kind's index_bounds), or ""."""
    bounds = kind.index_bounds(opts, in_features, out_features) if kind.index_bounds is not None else {}
    for pname, limits in bounds.items():
        got = tensors.get(pname)
        if got is None or got.numel() == 0:
            continue
        rows = got.reshape(len(limits), -1) if len(limits) > 1 else got.reshape(1, -1)
        for axis, (values, limit) in enumerate(zip(rows, limits)):
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= limit:
                where = f"row {axis} of " if len(limits) > 1 else ""
                bad = low if low < 0 else high
                return (f"{where}'{pname}' holds the index {bad}, outside [0, {limit}) (the site maps "
                        f"{in_features} -> {out_features} features)")
    return ""


def kinds() -> dict[str, AdapterKind]:
    """The adapter kinds by spec `type` name (an explicit table; nothing registers at import)."""
    from . import (adalora, adamss, adaption_prompt, beft, boft, bottleneck, c3a, cpt, delora, deft, delta, dora, ether, fourierft, glora, gralora, hira, lily, hra, hydra, ia3, ln_tuning, loha,
                   lokr, lora, lora_xs, lori, miss, multitask_prompt_tuning, oft, osf, parallel_adapter, peanut, poly, prefix, p_tuning, prompt_tuning, psoft, pvera, randlora, road, rosa, s2ft,
                   shira, supertuning, trainable_tokens, tinylora, unilora, vblora, vera, waveft, frod, xlora)

    table = [lora.LORA, delta.DELTA, dora.DORA, ia3.IA3, loha.LOHA, lokr.LOKR, vera.VERA, lora_xs.LORA_XS,
             oft.OFT, boft.BOFT, hra.HRA, shira.SHIRA, parallel_adapter.PARALLEL_ADAPTER, bottleneck.BOTTLENECK,
             hydra.HYDRA, s2ft.S2FT, prefix.PREFIX, ether.ETHER, ether.ETHER_PLUS, rosa.ROSA, lori.LORI, road.ROAD,
             fourierft.FOURIERFT, waveft.WAVEFT, frod.FROD, hira.HIRA, miss.MISS, randlora.RANDLORA,
             delora.DELORA, adalora.ADALORA, peanut.PEANUT, glora.GLORA, lily.LILY, gralora.GRALORA, c3a.C3A, pvera.PVERA, psoft.PSOFT, deft.DEFT, osf.OSF, supertuning.SUPERTUNING, beft.BEFT, adamss.ADAMSS,
             ln_tuning.LN_TUNING, trainable_tokens.TRAINABLE_TOKENS,
             prompt_tuning.PROMPT_TUNING, p_tuning.P_TUNING, multitask_prompt_tuning.MULTITASK_PROMPT_TUNING, cpt.CPT, adaption_prompt.ADAPTION_PROMPT,
             vblora.VBLORA, tinylora.TINYLORA, unilora.UNILORA, poly.POLY, xlora.XLORA]
    return {kind.name: kind for kind in table}
