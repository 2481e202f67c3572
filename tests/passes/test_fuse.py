"""fuse: LoRA sites grow into regions with their epilogues; every refused candidate says why."""
from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.passes.fuse import Fuse, dependency_graph, is_convex, partition, same_meta
from tests.conftest import hf_gpt2, hf_llama, lora_spec

KW = {"use_cache": False}
LLAMA_TARGETS = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def lora_regions(gm):
    return {r.name: r for r in partition(gm)[0] if r.kind == "lora_linear"}


def test_fuse_llama_regions_and_reasons():
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, lora_spec(LLAMA_TARGETS), KW)
    before = compiled.module.code
    compiled.apply(["fuse"])
    assert compiled.module.code == before                     # fuse only reports
    regions = lora_regions(compiled.module)
    at = "lora_linear@model.layers.0."
    # Before: linear, linear(linear(x, A), B), add(alpha=s), then the site's consumers.
    # Expected: each site one region; SwiGLU's silu and gate multiply join gate_proj; the residual
    # adds join o_proj and down_proj; q/v stop at the head reshape.
    assert {n: r.epilogue()[0] for n, r in regions.items()} == {
        at + "self_attn.q_proj": "", at + "self_attn.v_proj": "", at + "self_attn.o_proj": "add:0",
        at + "mlp.gate_proj": "silu,mul:0", at + "mlp.up_proj": "", at + "mlp.down_proj": "add:0"}
    gate = regions[at + "mlp.gate_proj"]
    assert [n.target for n in gate.nodes] == [torch.ops.aten.linear.default] * 3 + [
        torch.ops.aten.add.Tensor, torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor]
    assert gate.epilogue()[1] == [regions[at + "mlp.up_proj"].output]     # the gate operand is up_proj's output
    assert gate.scale == 2.0 and gate.rank == 4 and gate.weight_layout == "out_in"
    row = compiled.report.rows[-1]
    found = partition(compiled.module)[0]
    pointwise = sum(r.kind == "elementwise" for r in found)
    assert row.name == "fuse" and row.matches == 6 + pointwise      # six sites; the rest is the model's own math
    assert f"6 lora_linear regions, 0 bottleneck regions, {pointwise} elementwise regions" in row.notes[-1]
    reasons = dict(row.rejections)
    assert "int64" in reasons["elementwise@model.rotary_emb"]         # positions.to(float): no rule for ints
    assert "no epilogue rule" in reasons[at + "self_attn.q_proj + view"]
    up_gate = [why for where, why in reasons.items() if re.fullmatch(re.escape(at) + r"mlp\.up_proj \+ mul_\d+", where)]
    assert len(up_gate) == 1 and "already fused into " + at + "mlp.gate_proj" in up_gate[0]
    assert "plain GEMM" in reasons["linear_1 @ model.layers.0.self_attn.k_proj"]
    # RMSNorm: its pointwise ops and the mean over the last dim between them are one (row) group
    elementwise = {r.name: [str(n.target.overloadpacket.__name__) for n in r.nodes]
                   for r in found if r.kind == "elementwise"}
    for norm in ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"):
        assert elementwise["elementwise@" + norm] == ["to", "pow", "mean", "add", "rsqrt", "mul", "to", "mul"]
    recorded = {r["name"]: r for r in compiled.module.meta["surgeon_regions"]}
    assert recorded[at + "mlp.gate_proj"]["epilogue"] == "silu,mul:0"
    assert {r["kind"] for r in recorded.values()} == {"lora_linear", "elementwise"}


def test_fuse_gpt2_conv1d_sites_use_the_in_out_layout():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_fc"]), KW)
    regions = lora_regions(compiled.module)
    assert len(regions) == 2
    for region in regions.values():
        assert region.weight_layout == "in_out" and region.parts["bias"] is not None
        assert region.nodes[0].target is torch.ops.aten.addmm.default


class GatedMLP(nn.Module):
    """gelu-gated MLP with a per-channel scale (a broadcast operand) and a scaled residual."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
        self.channel = nn.Parameter(torch.linspace(0.5, 1.5, 24))

    def forward(self, x):
        h = F.gelu(self.gate(x)) * self.up(x)
        h = h * self.channel                  # one value per output: a gain step
        h = h * x[:, :1]                      # one value per row: broadcast, no rule
        return self.down(h) * 0.5 + x


def test_fuse_epilogue_rules_and_broadcast_refusal():
    model = GatedMLP().eval()
    compiled = surgeon.compile(model, (torch.randn(3, 16),), lora_spec(["gate", "up", "down"]))
    compiled.apply(["fuse"])
    regions = lora_regions(compiled.module)
    assert regions["lora_linear@gate"].epilogue()[0] == "gelu,mul:0,gain:1"
    assert regions["lora_linear@down"].epilogue()[0] == "scale:0.5,add:0"
    assert all(r.parts["bias"] is not None for r in regions.values())
    reasons = dict(compiled.report.rows[-1].rejections)
    assert "broadcast" in reasons["lora_linear@gate + mul_2"]


def test_is_convex_on_a_diamond():
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.relu, (x,))
    b = graph.call_function(torch.sum, (a,))          # outside the candidate
    c = graph.call_function(torch.add, (a, b))
    graph.output(c)
    gm = fx.GraphModule(nn.Module(), graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dependency = dependency_graph(gm)
    assert not is_convex(dependency, order, {a, c})         # a -> b -> c leaves and re-enters
    assert is_convex(dependency, order, {a, b, c})


def test_same_meta_compares_symbolic_dims():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    s0 = env.create_unbacked_symint()
    assert same_meta(((s0 * 2, 8), torch.float32), ((2 * s0, 8), torch.float32))
    assert not same_meta(((s0, 8), torch.float32), ((s0 + 1, 8), torch.float32))
    assert not same_meta(((4, 8), torch.float32), ((4, 8), torch.float16))


def test_fuse_is_a_registered_exact_pass():
    assert Fuse.name == "fuse" and Fuse.check == "exact"
    from surgeon.passes import passes

    assert passes()["fuse"] is Fuse


FAMILY = {"adapters": [
    {"name": "d", "type": "dora", "rank": 4, "targets": ["*.q_proj"]},
    {"name": "i", "type": "ia3", "targets": ["*.gate_proj", "*.k_proj"]},
    {"name": "b", "type": "bottleneck", "rank": 4, "activation": "gelu", "targets": ["*.down_proj"]},
    {"name": "p", "type": "parallel-adapter", "rank": 4, "targets": ["*.o_proj"]}], "pipeline": ["insert"]}


def test_fuse_dora_ia3_and_bottleneck_sites():
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, FAMILY, KW)
    compiled.apply(["fuse"])
    regions = {r.name: r for r in partition(compiled.module)[0] if r.kind != "elementwise"}
    at = "model.layers.0."
    # Before (DoRA): y, A/B linears, (g - 1) * y, y + that, g * lora, add(alpha=s): 8 nodes.
    # Expected: one lora_linear region, epilogue `gain` (g (x W^T + s B A x)), the gain node an operand.
    dora = regions[f"lora_linear@{at}self_attn.q_proj"]
    assert len(dora.nodes) == 8 and dora.epilogue()[0] == "gain:0" and dora.rank == 4
    assert dora.epilogue()[1][0].target is torch.ops.aten.div.Tensor          # m / ||W + s B A||
    # IA3: the linear alone seeds the region and y * l grows onto it as a gain (no LoRA operands)
    k_proj = regions[f"lora_linear@{at}self_attn.k_proj"]
    assert k_proj.epilogue()[0] == "gain:0" and k_proj.parts["lora_a"] is None and len(k_proj.nodes) == 2
    assert regions[f"lora_linear@{at}mlp.gate_proj"].epilogue()[0] == "gain:0,silu,mul:1"      # then SwiGLU
    # bottleneck (serial: reads y) and parallel adapter (reads x), each with the residual add
    down = regions[f"bottleneck@{at}mlp.down_proj"]
    assert down.parts["activation"] == "gelu" and down.parts["source"] is down.parts["residual"]
    assert down.epilogue()[0] == "add:0" and [n.target for n in down.nodes][:3] == [
        torch.ops.aten.linear.default, torch.ops.aten.gelu.default, torch.ops.aten.linear.default]
    o_proj = regions[f"bottleneck@{at}self_attn.o_proj"]
    assert o_proj.parts["activation"] == "relu" and o_proj.parts["source"] is not o_proj.parts["residual"]
    assert "2 bottleneck regions" in compiled.report.rows[-1].notes[-1]


def test_fuse_gpt2_dora_places_the_bias_after_the_gain():
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": "d", "type": "dora", "rank": 4, "targets": ["*.c_attn"]}], "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    regions = lora_regions(compiled.module)
    assert len(regions) == 2
    for region in regions.values():   # y - b is inside the region: g (x W + s x A^T B^T) + b
        assert region.epilogue()[0] == "gain:0,bias" and len(region.nodes) == 9 + 1     # + the row view
        assert region.weight_layout == "in_out" and region.parts["bias"] is not None


def test_a_site_of_another_form_is_reported_with_each_seeds_reason():
    model, args = hf_llama(layers=1)
    spec = {"adapters": [{"name": "h", "type": "lokr", "rank": 2, "targets": ["*.q_proj"]}], "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    regions, rejections = partition(compiled.module)
    assert not [r for r in regions if r.kind != "elementwise"]
    why = dict(rejections)["adapter h @ model.layers.0.self_attn.q_proj"]
    assert all(f"{seed}: " in why for seed in ("lora", "dora", "ia3", "bottleneck"))


def test_fuse_loha_sites_are_rank_r2_lora_regions():
    """LoHa on a linear site is x -> D x -> U (D x) (face-splitting identity, surgeon/adapters/loha.py),
    D and U built from the four factors: the LoRA seed takes it with rank r^2, D and U as its A and B."""
    model, args = hf_llama(layers=1)
    spec = {"adapters": [{"name": "h", "type": "loha", "rank": 4, "alpha": 8, "targets": ["*.q_proj", "*.o_proj"]}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    regions = lora_regions(compiled.module)
    at = "lora_linear@model.layers.0.self_attn."
    assert set(regions) == {at + "q_proj", at + "o_proj"}
    assert {r.rank for r in regions.values()} == {16} and {r.scale for r in regions.values()} == {2.0}
    assert regions[at + "o_proj"].epilogue()[0] == "add:0"                      # the residual joins as before
    assert all(r.parts["lora_a"].target is torch.ops.aten.view.default for r in regions.values())


def test_fuse_gpt2_grows_through_the_row_view_and_eval_dropout():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_proj"]), KW)     # c_fc plain: its GELU stands alone
    regions, _ = partition(compiled.module)
    by_name = {r.name: r for r in regions}
    # Before: addmm (2-D rows) -> view to (batch, seq, N) -> dropout(train=False) -> residual add.
    # Expected: the region takes the view and the identity dropout, so the residual add is its epilogue.
    proj = by_name["lora_linear@transformer.h.0.mlp.c_proj"]
    assert proj.epilogue()[0] == "add:0" and proj.parts["view"].target is torch.ops.aten.view.default
    assert [n.target for n in proj.nodes][-3:] == [torch.ops.aten.view.default, torch.ops.aten.dropout.default,
                                                    torch.ops.aten.add.Tensor]
    assert "view(view_" in proj.describe()
    # GPT-2's tanh GELU: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), all eight ops one group (two branches merged)
    act = by_name["elementwise@transformer.h.0.mlp.act"]
    assert [n.target.__name__.split(".")[0] for n in act.nodes] == ["mul", "pow", "mul", "add", "mul", "tanh",
                                                                   "add", "mul"]


def test_fuse_ends_a_lora_region_with_the_pointwise_group_that_uses_its_output():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_fc"]), KW)
    compiled.apply(["fuse"])
    regions, rejections = partition(compiled.module)
    # Before: c_fc's region stops at its view (3 users: the GELU reads x three times); the GELU is
    # its own elementwise group. Expected: the group is the end of c_fc's epilogue, x is its %0.
    c_fc = {r.name: r for r in regions}["lora_linear@transformer.h.0.mlp.c_fc"]
    assert c_fc.parts["program"].input_nodes == (c_fc.parts["view"],) and c_fc.parts["program_kinds"] == ()
    assert [op.rule for op in c_fc.parts["program"].ops] == ["mul", "pow", "mul", "add", "mul", "tanh", "add", "mul"]
    assert "program(8 pointwise ops)" in c_fc.describe() and len(c_fc.nodes) == 5 + 8
    assert not any(r.name.startswith("elementwise@transformer.h.0.mlp.act") for r in regions)
    assert not any(where.startswith(c_fc.name + " + ") for where, _ in rejections)


class BroadcastTail(nn.Module):
    """A LoRA linear whose output meets a per-row value (a broadcast no epilogue input may be)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x, row):
        return torch.sigmoid(self.proj(x)) * row.tanh()


def test_a_group_reading_a_per_row_value_stays_its_own_region():
    compiled = surgeon.compile(BroadcastTail().eval(), (torch.randn(3, 16), torch.randn(3, 1)), lora_spec(["proj"]))
    regions, rejections = partition(compiled.module)
    assert "program" not in {r.name: r for r in regions}["lora_linear@proj"].parts
    why = dict(rejections)
    assert any("is neither a tile, one value per column nor one value" in v for v in why.values()), why


IA3 = {"adapters": [{"name": "i", "type": "ia3", "targets": ["*.k_proj", "*.v_proj"]},
                    {"name": "f", "type": "ia3", "on": "input", "targets": ["*.down_proj"]}], "pipeline": ["insert"]}


def test_fuse_ia3_on_the_input_is_a_prologue_of_the_linear():
    """PEFT's IA3 recipe: k/v outputs scaled, the FFN's down_proj input scaled (x * l before the GEMM)."""
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, IA3, KW)
    regions = lora_regions(compiled.module)
    down = regions["lora_linear@model.layers.0.mlp.down_proj"]
    # Before: mul(x, l) -> linear -> residual add. Expected: one region, the scale as prologue operand 0.
    assert [n.target for n in down.nodes] == [torch.ops.aten.mul.Tensor, torch.ops.aten.linear.default,
                                              torch.ops.aten.add.Tensor]
    assert down.epilogue()[0] == "x_gain:0|add:1" and down.parts["x"] is not down.nodes[0]
    assert down.epilogue()[1][0] is down.parts["x_gain"] and "linear(x*gain)" in down.describe()
    assert regions["lora_linear@model.layers.0.self_attn.k_proj"].epilogue()[0] == "gain:0"


def test_fuse_gpt2_bottleneck_grows_through_the_row_view_too():
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": "b", "type": "bottleneck", "rank": 4, "targets": ["*.c_proj"]}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    regions = {r.name: r for r in partition(compiled.module)[0] if r.kind == "bottleneck"}
    # Before: y = addmm (2-D rows), the branch on y, add, view, dropout, residual add.
    # Expected: one region; the residual add is its epilogue through the view and the identity dropout.
    mlp = regions["bottleneck@transformer.h.0.mlp.c_proj"]
    assert mlp.epilogue()[0] == "add:0" and mlp.parts["view"].target is torch.ops.aten.view.default
    assert "view(view_" in mlp.describe() and len(regions) == 4


def test_fuse_vera_sites_are_lora_regions_with_their_vectors_as_a_prologue():
    model, args = hf_llama(layers=1)
    spec = {"adapters": [{"name": "v", "type": "vera", "rank": 4, "targets": ["*.q_proj", "*.gate_proj"]}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    regions = lora_regions(compiled.module)
    # Before: y, A x (A a slice of the shared vera_A), * d, B (.), * b, add. Expected: one region each;
    # d and b are the prologue's operands, the slices of the shared matrices its A and B.
    q = regions["lora_linear@model.layers.0.self_attn.q_proj"]
    assert q.epilogue()[0] == "vera_d:0,vera_b:1|" and len(q.nodes) == 6 and q.rank == 4
    assert q.parts["lora_a"].target is torch.ops.aten.slice.Tensor and "+vera(v)" in q.describe()
    assert regions["lora_linear@model.layers.0.mlp.gate_proj"].epilogue()[0] == "vera_d:0,vera_b:1|silu,mul:2"
