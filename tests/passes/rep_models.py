"""Training-time multi-branch blocks for the fold-bn / reparameterize tests and benchmark.

Plain nn.Modules in the shapes the papers use (RepVGG, ACNet, MobileOne, a RepNeXt-style
multi-scale depthwise mixer), and the same families as timm's training-time modules compute them
(in-place branch sums, BatchNorm1d over flattened tokens, BN -> dropout -> linear heads: LeViT,
EfficientViT); none has a `reparameterize()` method: the passes must find the
structure in the captured graph. `randomize_bn` gives every BatchNorm non-trivial statistics
and affine parameters, as training would. The checks at the end (relative error against the
eager model, op lists) are shared by test_fold_bn.py, test_reparameterize.py and the benchmark.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel, stride=1, padding=0, groups=1, bias=False, dilation=1) -> nn.Sequential:
    """conv2d followed by BatchNorm2d (the unit every branch is built from)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias),
                         nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """relu(BN(conv3x3 x) + BN(conv1x1 x) [+ BN(x)]): the RepVGG training-time block."""

    def __init__(self, cin: int, cout: int, stride=1, groups=1, bias=False, identity=True):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups, bias)
        self.one_by_one = conv_bn(cin, cout, 1, stride, 0, groups, bias)
        self.identity = nn.BatchNorm2d(cin) if identity and cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one_by_one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class ACBlock(nn.Module):
    """ACNet: square 3x3 plus horizontal 1x3 and vertical 3x1 kernels, each with its BN."""

    def __init__(self, cin: int, cout: int, stride=1):
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.horizontal = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.vertical = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x):
        return torch.relu(self.square(x) + self.horizontal(x) + self.vertical(x))


class MobileOneBlock(nn.Module):
    """MobileOne: k over-parameterized kxk branches + a 1x1 scale branch (k > 1) + a BN identity,
    each branch with its BN, then ReLU. Depthwise with groups=channels, pointwise with kernel 1."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, k: int = 3):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(k))
        self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class RepNeXtMixer(nn.Module):
    """A RepNeXt-style depthwise token mixer: multi-scale parallel kernels (7x7, 5x5, 3x3, 1x7, 7x1),
    serial pairs (1x1 -> 5x5, 3x3 -> 1x1), a branch whose inner part is itself a sum
    (1x1 -> BN(3x3 + 1x3)), a BN identity and the residual identity."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.k7, self.k5, self.k3 = (conv_bn(c, c, k, 1, k // 2, groups=c) for k in (7, 5, 3))
        self.row = conv_bn(c, c, (1, 7), 1, (0, 3), groups=c)
        self.col = conv_bn(c, c, (7, 1), 1, (3, 0), groups=c)
        self.expand = nn.Conv2d(c, c, 1, groups=c, bias=False)                 # 1x1 -> 5x5
        self.after_expand = conv_bn(c, c, 5, 1, 2, groups=c)
        self.before_project = conv_bn(c, c, 3, 1, 1, groups=c)                 # 3x3 -> 1x1
        self.project = conv_bn(c, c, 1, groups=c)
        self.nested_in = nn.Conv2d(c, c, 1, groups=c, bias=False)              # 1x1 -> BN(3x3 + 1x3)
        self.nested_a = nn.Conv2d(c, c, 3, 1, 1, groups=c)
        self.nested_b = nn.Conv2d(c, c, (1, 3), 1, (0, 1), groups=c)
        self.nested_bn = nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        nested_input = self.nested_in(x)
        nested = self.nested_bn(self.nested_a(nested_input) + self.nested_b(nested_input))
        multi_scale = self.k7(x) + self.k5(x) + self.k3(x) + self.row(x) + self.col(x)
        serial = self.after_expand(self.expand(x)) + self.project(self.before_project(x))
        return x + multi_scale + serial + nested + self.identity(x)


class LinearHead(nn.Module):
    """BN1d -> (linear + bottleneck linear pair, no activation) -> BN1d: the host absorbs the bottleneck."""

    def __init__(self, features: int, classes: int, rank: int = 4):
        super().__init__()
        self.norm_in = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, classes)
        self.down = nn.Linear(features, rank, bias=False)
        self.up = nn.Linear(rank, classes)
        self.norm_out = nn.BatchNorm1d(classes)

    def forward(self, z):
        z = self.norm_in(z)
        return self.norm_out(self.fc(z) + self.up(self.down(z)))


class RepNet(nn.Module):
    """A small network of the blocks above, with a pooled linear head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        w = width
        self.blocks = nn.Sequential(
            RepVGGBlock(3, w, stride=2), RepVGGBlock(w, w), ACBlock(w, w),
            MobileOneBlock(w, w, 3, groups=w, k=2), MobileOneBlock(w, w, 1, k=2),
            RepNeXtMixer(w), RepVGGBlock(w, 2 * w, stride=2, groups=2))
        self.head = LinearHead(2 * w, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


# ---------------------------------------------------------------- as timm writes its reparameterizable families
# The same structures as above, written the way timm's training-time modules compute them: branch sums
# in place (`out += branch(x)`, export's aten.add_), absent branches as a literal 0, BatchNorm1d over
# flattened tokens and classifier heads with a BatchNorm1d and a dropout before the linear. The class
# docstrings give what timm's reparameterize_model leaves of each (the counts the tests hold us to).


class InplaceRepVGGBlock(nn.Module):
    """RepVGG (timm's RepVggBlock): relu(BN(conv1x1 x) + BN(convkxk x)), then `+= BN(x)` in place when
    in == out and stride 1. timm's reparameterize_model leaves 1 conv, 0 BatchNorms."""

    def __init__(self, cin: int, cout: int, stride=1, groups=1):
        super().__init__()
        self.conv_kxk = conv_bn(cin, cout, 3, stride, 1, groups)
        self.conv_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
        if self.identity is None:
            return torch.relu(self.conv_1x1(x) + self.conv_kxk(x))
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x += identity
        return torch.relu(x)


class InplaceMobileOneBlock(nn.Module):
    """MobileOne (timm's MobileOneBlock): a 1x1 conv-BN scale branch (kernel > 1) and a BN identity
    (in == out, stride 1), each 0 when absent, then k over-parameterized kxk conv-BN branches added in
    place, then ReLU. timm's reparameterize_model leaves 1 conv, 0 BatchNorms."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, k: int = 4):
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.conv_kxk = nn.ModuleList(conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(k))

    def forward(self, x):
        identity_out = self.identity(x) if self.identity is not None else 0
        scale_out = self.conv_scale(x) if self.conv_scale is not None else 0
        out = scale_out + identity_out
        for branch in self.conv_kxk:
            out += branch(x)
        return torch.relu(out)


class RepMixer(nn.Module):
    """FastViT's token mixer (timm's RepMixer): x + gamma * (mixer(x) - norm(x)), where mixer is a
    depthwise MobileOne block without activation (kxk conv-BN + 1x1 conv-BN + BN identity) and norm
    one with only its BN identity. timm's reparameterize_model leaves 1 depthwise conv, 0 BatchNorms
    (it also folds the layer scale and the residual into that conv)."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.mixer_kxk = conv_bn(dim, dim, kernel, 1, kernel // 2, dim)
        self.mixer_scale = conv_bn(dim, dim, 1, 1, 0, dim)
        self.mixer_identity = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x):
        mixed = self.mixer_kxk(x) + self.mixer_scale(x) + self.mixer_identity(x)
        return x + self.gamma * (mixed - self.norm(x))


class NegatedBranches(nn.Module):
    """-conv_a(x) - bn(x) + conv_c(relu(x)): a negation and a subtraction; conv_c merges with nothing."""

    def __init__(self, dim: int):
        super().__init__()
        self.a = conv_bn(dim, dim, 3, 1, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.c = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return -self.a(x) - self.bn(x) - self.c(torch.relu(x))


class AttentionBias(nn.Module):
    """LeViT / TinyViT attention biases: a (heads, offsets) parameter gathered by a fixed index buffer
    into (heads, N, N) and added to the scores. timm caches the gathered table in eval mode."""

    def __init__(self, heads: int = 2, side: int = 3):
        super().__init__()
        points = [(i, j) for i in range(side) for j in range(side)]
        offsets, idxs = {}, []
        for p in points:
            for q in points:
                idxs.append(offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets)))
        self.biases = nn.Parameter(torch.randn(heads, len(offsets)))
        self.register_buffer("idxs", torch.tensor(idxs).view(len(points), len(points)))
        self.gamma = nn.Parameter(torch.rand(heads) + 0.5)

    def forward(self, scores):                     # scores: (B, heads, N, N)
        return (scores + self.biases[:, self.idxs]).softmax(-1) * self.gamma.view(1, -1, 1, 1)


class StdConv(nn.Module):
    """BiT's weight-standardized conv (the weight computed from the parameter on every call), then BN."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        w = self.weight
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), keepdim=True, unbiased=False)
        return torch.relu(self.bn(nn.functional.conv2d(x, (w - mean) / torch.sqrt(var + 1e-6), padding=1)))


class MobileOneStage(nn.Module):
    """MobileOne's depthwise-then-pointwise pair, downsampling then not: 4 blocks, so 4 convs after timm."""

    def __init__(self, cin: int, cout: int, k: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(
            InplaceMobileOneBlock(cin, cin, 3, 2, cin, k), InplaceMobileOneBlock(cin, cout, 1, 1, 1, k),
            InplaceMobileOneBlock(cout, cout, 3, 1, cout, k), InplaceMobileOneBlock(cout, cout, 1, 1, 1, k))

    def forward(self, x):
        return self.blocks(x)


class LinearNorm(nn.Module):
    """LeViT's linear + BatchNorm1d over the flattened tokens: bn(y.flatten(0, 1)).reshape_as(y)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """The LeViT / EfficientViT classifier head: BatchNorm1d -> dropout -> linear."""

    def __init__(self, features: int, classes: int, drop: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(features, classes)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class LeViTTail(nn.Module):
    """LeViT on tokens (B, N, C): a residual MLP of two LinearNorms around a hardswish, mean over tokens,
    then the distilled pair of NormLinear heads averaged. timm's reparameterize_model leaves 4 linears,
    0 convs, 0 BatchNorms."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.mlp = nn.Sequential(LinearNorm(dim, hidden), nn.Hardswish(), LinearNorm(hidden, dim))
        self.head, self.head_dist = NormLinear(dim, classes), NormLinear(dim, classes)

    def forward(self, x):
        x = x + self.mlp(x)
        x = x.mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


class FlatConvNorm(nn.Module):
    """A conv whose BatchNorm1d runs on the output flattened over space: bn(y.flatten(2)).view_as(y)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x.flatten(2)).view_as(x)


class EfficientViTTail(nn.Module):
    """EfficientViT-style: conv-BN, a depthwise conv-BN with the BN after a reshape, a pointwise conv-BN,
    global pool + flatten, and the NormLinear head. timm's reparameterize_model leaves 3 convs, 1 linear,
    0 BatchNorms."""

    def __init__(self, cin: int = 3, dim: int = 16, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(cin, dim, 3, 2, 1)
        self.dw = FlatConvNorm(dim, dim, 3, 1, dim)
        self.pw = conv_bn(dim, dim, 1)
        self.head = NormLinear(dim, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.pw(torch.relu(self.dw(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm (in place, test setup)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def build(factory, *args, seed: int = 0, **kwargs) -> nn.Module:
    """A seeded model from `factory` with randomized BatchNorms, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(factory(*args, **kwargs), seed)


# ---------------------------------------------------------------- checks shared by the tests

REP = {"pipeline": ["fold-bn", "reparameterize"]}


def rel_err(want: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - want| / max |want| (what the pipeline's "close" check measures)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def assert_matches_eager(model: nn.Module, module: nn.Module, *inputs: torch.Tensor, tol: float = 1e-5) -> None:
    """The compiled module reproduces the ORIGINAL eager model on each input, within `tol` (fp32)."""
    with torch.no_grad():
        for x in inputs:
            want, got = model(x), module(x)
            for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
                assert rel_err(a, b) < tol, f"relative error {rel_err(a, b):.2e} on input {list(x.shape)}"


def op_names(gm) -> list[str]:
    """The graph's call_function ops by short name, in order (e.g. ['conv2d', 'batch_norm', 'relu'])."""
    return [_short(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def op_nodes(gm, name: str) -> list:
    """The call_function nodes of op `name` (short name, e.g. 'conv2d')."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and _short(n.target) == name]


def _short(target) -> str:
    return str(target).split(".")[1] if isinstance(target, torch._ops.OpOverload) else target.__name__
