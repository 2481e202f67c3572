"""fuse: LoRA sites grow into regions with their epilogues; every refused candidate says why."""
from __future__ import annotations

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
    assert row.name == "fuse" and row.matches == 6
    reasons = dict(row.rejections)
    assert "no epilogue rule" in reasons[at + "self_attn.q_proj + view"]
    assert "already fused into " + at + "mlp.gate_proj" in reasons[at + "mlp.up_proj + mul_11"]
    assert "plain GEMM" in reasons["linear_1 @ model.layers.0.self_attn.k_proj"]
    assert "not convex" in reasons["elementwise@model.layers.0.input_layernorm"]   # the mean sits inside
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
        h = h * self.channel
        return self.down(h) * 0.5 + x


def test_fuse_epilogue_rules_and_broadcast_refusal():
    model = GatedMLP().eval()
    compiled = surgeon.compile(model, (torch.randn(3, 16),), lora_spec(["gate", "up", "down"]))
    compiled.apply(["fuse"])
    regions = lora_regions(compiled.module)
    assert regions["lora_linear@gate"].epilogue()[0] == "gelu,mul:0"
    assert regions["lora_linear@down"].epilogue()[0] == "scale:0.5,add:0"
    assert all(r.parts["bias"] is not None for r in regions.values())
    reasons = dict(compiled.report.rows[-1].rejections)
    assert "broadcast" in reasons["lora_linear@gate + mul_1"]


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
    from surgeon.passes_table import passes

    assert passes()["fuse"] is Fuse
