"""LoRA on conv sites: structure, exact identity insert, merge, grouped convs, PEFT parity.

On a conv site (conv1d / conv2d / conv3d, `padding="same"` too) A is a conv with the site's kernel,
stride, padding and dilation (in -> r) and B a 1x1 conv (r -> out); the merged weight is
W + s (B A).view(W.shape). On a grouped conv B is a grouped 1x1 conv (out x r / groups), as PEFT
builds it; that update reads every input channel, so it does not merge into the grouped weight.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgeon
from tests.adapters.helpers import NAME, assert_close, spec
from tests.conftest import randomize_adapters, small_cnn
from tests.passes.helpers import adapter_nodes, logits

CONVS = ["stem.0", "block1.0", "block1.3", "block2.0"]
aten = torch.ops.aten


def test_conv_lora_structure_identity_and_merge():
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, spec("lora", CONVS + ["head"], rank=2, alpha=4))
    row = compiled.report.rows[-1]
    assert (row.matches, row.check) == (5, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    convs = [n for n in adapter_nodes(compiled.module, NAME) if n.target is aten.conv2d.default]
    assert len(convs) == 2 * len(CONVS)   # A (site kernel) and B (1x1) per conv site
    stem_a = next(n for n in convs if n.meta["surgeon_path"] == "stem.0" and n.args[1].meta["val"].shape[-1] == 3)
    assert list(stem_a.args[1].meta["val"].shape) == [2, 3, 3, 3] and stem_a.args[4] == [1, 1]   # padding 1
    # A: r x (in * kh * kw), B: out x r for every conv; the head is a plain linear site
    expected = 2 * (27 + 8) + 2 * 2 * (72 + 8) + 2 * (8 + 8) + 2 * (8 + 10)
    assert compiled.adapters[NAME].param_count == expected
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == expected
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    stem = compiled.module.get_parameter("stem.0.adapter_ad.lora_A").detach().clone()
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    merged = compiled.module.get_parameter("stem.0.weight")
    delta = 2.0 * (compiled.adapters[NAME].sites[0].merged["lora_B"] @ stem).view(8, 3, 3, 3)
    assert torch.allclose(merged, model.stem[0].weight + delta, atol=1e-6)
    assert_close(logits(compiled.module, args), before)
    compiled.apply(["unmerge"])
    assert_close(logits(compiled.module, args), before)


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6)

    def forward(self, x):
        return self.depthwise(self.down(x))


def test_strided_dilated_conv_and_grouped_refusal():
    """A rank that is no multiple of the groups is refused with the reason (PEFT refuses it too)."""
    model, args = Strided().eval(), (torch.randn(1, 4, 11, 12, generator=torch.Generator().manual_seed(0)),)
    compiled = surgeon.compile(model, args, spec("lora", ["down", "depthwise"], rank=3))
    assert compiled.report.rows[-1].matches == 1
    assert compiled.report.rows[-1].rejections == [
        (f"{NAME} @ depthwise", "grouped conv2d (groups=6): LoRA's rank 3 is not a multiple of groups "
                                "(PEFT refuses it too)")]
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), before)
    with pytest.raises(surgeon.SpecError, match="groups=6"):
        surgeon.compile(model, args, spec("lora", ["depthwise"]))
    with pytest.raises(surgeon.SpecError, match="PiSSA splits a dense weight's SVD"):
        surgeon.compile(model, args, spec("lora", ["depthwise"], rank=6, init="pissa"))


def test_kinds_without_grouped_conv_support_still_refuse_it():
    model, args = Strided().eval(), (torch.randn(1, 4, 11, 12, generator=torch.Generator().manual_seed(0)),)
    compiled = surgeon.compile(model, args, spec("ia3", ["down", "depthwise"]))
    assert compiled.report.rows[-1].rejections == [
        (f"{NAME} @ depthwise", "grouped conv2d (groups=6) is not supported by a 'ia3' adapter: "
                                "its weight is not one out x in map")]


class Grouped(nn.Module):
    """RegNet's grouped 3x3 between 1x1s, and a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(12, 12, 3, stride=2, groups=12, bias=False)

    def forward(self, x):
        return self.depthwise(torch.relu(self.grouped(torch.relu(self.expand(x)))))


def _grouped():
    torch.manual_seed(0)
    return Grouped().eval(), (torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0)),)


def test_grouped_conv_lora_structure_identity_and_merge_refusal():
    """Before: 'grouped conv2d (groups=2) is not supported'. A is ungrouped over all input
    channels with the site's kernel; B a grouped 1x1 conv, out x (r / groups)."""
    model, args = _grouped()
    compiled = surgeon.compile(model, args, spec("lora", ["grouped", "depthwise"], rank=12))
    assert (compiled.report.rows[-1].matches, compiled.report.rows[-1].check) == (2, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    sites = {s.path: s for s in compiled.adapters[NAME].sites}
    assert {p: (s.in_features, s.options["groups"]) for p, s in sites.items()} == {
        "grouped": (8 * 9, 2), "depthwise": (12 * 9, 12)}
    b_convs = [n for n in adapter_nodes(compiled.module, NAME)
               if n.target is aten.conv2d.default and n.args[1].meta["val"].shape[-1] == 1]
    assert sorted((list(n.args[1].meta["val"].shape), n.args[6]) for n in b_convs) == [
        ([12, 1, 1, 1], 12), ([12, 6, 1, 1], 2)]
    expected = 12 * (72 + 6) + 12 * (108 + 1)   # A r x (in * 9), B out x r / groups
    assert compiled.adapters[NAME].param_count == expected
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == expected
    randomize_adapters(compiled.module)
    assert not torch.allclose(logits(compiled.module, args), logits(model, args), atol=1e-4)
    with pytest.raises(surgeon.SpecError, match="cannot merge adapter 'ad': a LoRA on a grouped conv reads every "
                                                "input channel"):
        compiled.apply(["merge"])


def test_grouped_conv_lora_forward_is_the_dense_delta():
    """The branch equals a conv with the dense delta s B' A (B' block-diagonal), the map PEFT computes."""
    from surgeon.adapters.lora import LORA

    model, args = _grouped()
    compiled = surgeon.compile(model, args, spec("lora", ["grouped"], rank=4, alpha=8))
    randomize_adapters(compiled.module)
    site = compiled.adapters[NAME].sites[0]
    params = {p: compiled.module.get_parameter(t).detach() for p, t in site.params.items()}
    delta = LORA.delta_weight(params, site.options, None).float().view(12, 8, 3, 3)
    x = torch.relu(model.expand(args[0]))
    dense = torch.block_diag(*[w.flatten(1) for w in model.grouped.weight.view(2, 6, 4 * 9)]).view(12, 8, 3, 3)
    want = model.depthwise(torch.relu(torch.conv2d(x, dense + delta, model.grouped.bias, padding=1)))
    assert_close(logits(compiled.module, args), want)


def test_peft_parity_grouped_conv_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model, args = _grouped()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["expand", "grouped", "depthwise"],
                             rank_pattern={"depthwise": 12})
    with pytest.warns(UserWarning, match="groups > 1"):
        wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    _perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
    assert {s.path: s.options.get("groups") for s in compiled.adapters[NAME].sites} == {
        "expand": None, "grouped": 2, "depthwise": 12}
    assert_close(logits(compiled.module, args), logits(wrapped, args))


class SameAndDilated(nn.Module):
    """EfficientNet's `padding="same"` (an even kernel pads unevenly) and a dilated "same" conv."""

    def __init__(self, dilation: int = 2):
        super().__init__()
        self.odd = nn.Conv2d(3, 6, 3, padding="same")
        self.even = nn.Conv2d(6, 5, (4, 2), padding="same")
        self.dilated = nn.Conv2d(5, 4, 3, padding="same", dilation=dilation)

    def forward(self, x):
        return self.dilated(torch.relu(self.even(torch.relu(self.odd(x)))))


def test_same_padding_conv_lora_identity_structure_and_merge():
    """Before: an aten.conv2d.padding op was no site ('select no linear/addmm/conv2d op')."""
    torch.manual_seed(0)
    model, args = SameAndDilated().eval(), (torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0)),)
    compiled = surgeon.compile(model, args, spec("lora", ["odd", "even", "dilated"], rank=2))
    assert (compiled.report.rows[-1].matches, compiled.report.rows[-1].check) == (3, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    a_convs = [n for n in adapter_nodes(compiled.module, NAME) if n.target is aten.conv2d.padding]
    assert sorted(tuple(n.args[1].meta["val"].shape[2:]) + (n.args[4], tuple(n.args[5])) for n in a_convs) == [
        (3, 3, "same", (1, 1)), (3, 3, "same", (2, 2)), (4, 2, "same", (1, 1))]
    _assert_merge_round_trip(compiled, args)


def _assert_merge_round_trip(compiled, args):
    """Merge folds the adapter into the weights (no adapter op left), unmerge takes it back out."""
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    assert_close(logits(compiled.module, args), before)
    compiled.apply(["unmerge"])
    assert_close(logits(compiled.module, args), before)


def _perturb(wrapped):
    """Non-zero PEFT adapter weights, as after training."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _assert_peft_parity(model, args, targets, tmp_path):
    """A PEFT checkpoint imports with PEFT's output, and merges to PEFT's merged model."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = wrapped.eval()
    _perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
    assert sorted(s.path for s in compiled.adapters[NAME].sites) == sorted(targets)
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), logits(wrapped.merge_and_unload(), args))


def test_peft_parity_same_padding_conv_lora(tmp_path):
    # PEFT's lora_A takes the conv's kernel, stride and padding but not its dilation: undilated here
    torch.manual_seed(0)
    model, args = SameAndDilated(dilation=1).eval(), (torch.randn(2, 3, 7, 8),)
    _assert_peft_parity(model, args, ["odd", "even", "dilated"], tmp_path)


class Sequence(nn.Module):
    """SqueezeBERT's position-wise nn.Conv1d (kernel 1, grouped) and a strided, padded conv1d."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Conv1d(6, 8, 3, stride=2, padding=1)
        self.pointwise = nn.Conv1d(8, 8, 1)
        self.grouped = nn.Conv1d(8, 4, 1, groups=4)

    def forward(self, x):
        return self.grouped(torch.relu(self.pointwise(torch.relu(self.wide(x)))))


def _sequence():
    torch.manual_seed(0)
    return Sequence().eval(), (torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0)),)


def test_conv1d_lora_structure_identity_and_merge():
    """Before: aten.conv1d was no site. A is a conv1d with the site's kernel, B a 1x1 conv1d."""
    model, args = _sequence()
    compiled = surgeon.compile(model, args, spec("lora", ["wide", "pointwise"], rank=2))
    assert (compiled.report.rows[-1].matches, compiled.report.rows[-1].check) == (2, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    convs = [n for n in adapter_nodes(compiled.module, NAME) if n.target is aten.conv1d.default]
    wide_a = next(n for n in convs if n.meta["surgeon_path"] == "wide" and n.args[1].meta["val"].shape[-1] == 3)
    assert list(wide_a.args[1].meta["val"].shape) == [2, 6, 3] and (wide_a.args[3], wide_a.args[4]) == ([2], [1])
    assert len(convs) == 4
    assert compiled.adapters[NAME].param_count == 2 * (18 + 8) + 2 * (8 + 8)
    _assert_merge_round_trip(compiled, args)
    merged = compiled.module.get_parameter("pointwise.weight")
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "pointwise")
    compiled.apply(["merge"])
    delta = 1.0 * (site.merged["lora_B"] @ site.merged["lora_A"]).view(8, 8, 1)
    assert torch.allclose(compiled.module.get_parameter("pointwise.weight"), merged + delta, atol=1e-6)


def test_peft_parity_conv1d_lora(tmp_path):
    model, args = _sequence()
    _assert_peft_parity(model, args, ["wide", "pointwise"], tmp_path)


def test_peft_parity_grouped_conv1d_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model, args = _sequence()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wide", "grouped"])
    with pytest.warns(UserWarning, match="groups > 1"):
        wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    _perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
    assert_close(logits(compiled.module, args), logits(wrapped, args))


class Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1)
        self.same = nn.Conv3d(4, 3, (1, 3, 3), padding="same")

    def forward(self, x):
        return self.same(torch.relu(self.stem(x)))


def _volume():
    torch.manual_seed(0)
    return Volume().eval(), (torch.randn(1, 2, 4, 6, 6, generator=torch.Generator().manual_seed(0)),)


def test_conv3d_lora_identity_and_merge():
    """Before: aten.conv3d (and conv3d.padding) were no sites."""
    model, args = _volume()
    compiled = surgeon.compile(model, args, spec("lora", ["stem", "same"], rank=2))
    assert (compiled.report.rows[-1].matches, compiled.report.rows[-1].check) == (2, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    assert compiled.adapters[NAME].param_count == 2 * (2 * 27 + 4) + 2 * (4 * 9 + 3)
    _assert_merge_round_trip(compiled, args)


def test_peft_parity_conv3d_lora(tmp_path):
    model, args = _volume()
    _assert_peft_parity(model, args, ["stem", "same"], tmp_path)


def test_kinds_listing_only_conv2d_reject_the_new_conv_ops():
    model, args = _sequence()
    with pytest.raises(surgeon.SpecError, match=r"a 'ia3' adapter does not attach to conv1d \(it supports "
                                                r"linear, addmm, conv2d\)"):
        surgeon.compile(model, args, spec("ia3", ["wide"]))


def test_kind_without_conv_support_is_rejected_with_reason():
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, spec("dora", ["stem.0", "head"], rank=2))
    assert compiled.report.rows[-1].matches == 1
    assert compiled.report.rows[-1].rejections == [
        (f"{NAME} @ stem.0", "a 'dora' adapter does not attach to conv2d (it supports linear, addmm)")]


def test_peft_parity_conv_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model, args = small_cnn()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CONVS + ["head"], rank_pattern={"block2.0": 2})
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(tmp_path)
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
    assert {s.path: s.options["rank"] for s in compiled.adapters[NAME].sites}["block2.0"] == 2
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), logits(wrapped.merge_and_unload(), args))


def test_conv_lora_exports_in_peft_layout(tmp_path):
    """Before: save_adapter(format='peft') wrote 2-D A/B for conv sites and PEFT failed to load them."""
    peft = pytest.importorskip("peft")
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "type": "lora", "targets": CONVS + ["head"],
                                                           "rank": 4, "alpha": 8}], "pipeline": ["insert"]})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert_close(logits(loaded, args), expected)
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
    assert_close(logits(again.module, args), expected)


class StdConv2d(nn.Conv2d):
    """BiT's weight-standardized conv (timm's StdConv2d): the weight is standardized on every call."""

    def forward(self, x):
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                     momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BiTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = StdConv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = StdConv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_weight_standardized_conv_takes_lora_on_the_weight_it_uses():
    """Issue 18: before, targets on a BiT conv selected nothing (its conv reads a computed weight, not a
    parameter). The standardized weight is computed once and frozen (the base is frozen while LoRA
    trains), and merge adds into the weight the conv really uses, so it is exact."""
    torch.manual_seed(0)
    model = BiTBlock().eval()
    args = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),)
    compiled = surgeon.compile(model, args, spec("lora", ["conv1", "conv2"], rank=2, alpha=4))
    row = compiled.report.rows[-1]
    assert (row.matches, row.check) == (2, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    params = dict(compiled.module.named_parameters())
    assert {"conv1.weight_computed", "conv2.weight_computed"} <= set(params) and "conv1.weight" not in params
    assert [n for n in row.notes if "weight_computed" in n] == [
        f"{m}.weight_computed: the op's weight is computed from parameters on every call; computed once and "
        "frozen here (the base is frozen while adapters train)" for m in ("conv1", "conv2")]
    assert sorted(k for k, p in params.items() if p.requires_grad) == sorted(
        f"{m}.adapter_{NAME}.lora_{f}" for m in ("conv1", "conv2") for f in "AB")
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    assert not torch.allclose(before, logits(model, args), atol=1e-3)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), before)
    assert not any(n.meta.get("surgeon_adapter") for n in compiled.module.graph.nodes)


def test_peft_lora_on_a_weight_standardized_conv_is_refused_naming_the_module(tmp_path):
    """PEFT makes lora_A a StdConv2d too (type(base_layer)), so its A is standardized on every call;
    importing it as a plain A would silently compute another model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = BiTBlock().eval()
    args = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1"]))
    assert type(wrapped.base_model.model.conv1.lora_A["default"]) is StdConv2d
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(surgeon.SpecError, match=r"adapters\[0\]\.from_peft.*module 'conv1' \(StdConv2d\) computes its "
                                                r"conv weight.*lora_A as a StdConv2d too"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
