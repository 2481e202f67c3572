"""The mixed_lora_linear region: fuse finds it in a mixed-batch graph, lower replaces it, and the lowered graph
computes what the unfused mixed graph computes (and PEFT's mixed batch), on the torch reference path and
through the generated kernels under TRITON_INTERPRET=1.

Kernel cases are awkward on purpose and small (each interpreted program instance costs tens of ms): ranks 1
and 64 in one bank, an adapter no row uses (an empty segment), one row, every row "__base__", 100 adapters in
the bank with few rows; epilogues with a gate tile, a residual tile, a per-column gain, a constant and an
activation; fp32 and fp16 (bf16 tl.dot is wrong in the interpreter).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon import serving
from surgeon.fastpath import recompile
from surgeon.kernels import mixed_lora as kernel
from surgeon.kernels import mixed_lora_region as region
from surgeon.kernels.dispatch import backend
from surgeon.kernels.epilogue import steps
from surgeon.passes.fuse import Fuse, partition
from surgeon.passes.lower import Lower
from tests.conftest import hf_gpt2, hf_llama, peft_lora_checkpoint, randomize_adapters
from tests.kernels.sm90 import compile_sm90, jit_mode

K, N = 24, 40
# kernel (one rounding after the epilogue) vs reference (a rounding after every op)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=4e-3, atol=4e-3)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
MODES = pytest.mark.parametrize("mode", ["bgmv", "sgmv"])
EPILOGUES = ["silu,mul:0,add:1,scale:0.5", "gain:0,gelu_tanh", ""]


def make_bank(ranks, dtype, seed=0) -> kernel.LoraBank:
    gen = torch.Generator().manual_seed(seed)
    adapters = [(torch.randn(r, K, generator=gen) * K ** -0.5, torch.randn(N, r, generator=gen) * r ** -0.5,
                 0.5 + 0.25 * (i % 7)) for i, r in enumerate(ranks)]
    return kernel.LoraBank.build(adapters, dtype=dtype)


def make_call(index, dtype, epilogue, seed=1):
    gen = torch.Generator().manual_seed(seed)
    M = len(index)
    x, y = torch.randn(M, K, generator=gen).to(dtype), torch.randn(M, N, generator=gen).to(dtype)
    operands = [torch.randn(M, N, generator=gen).to(dtype), torch.randn(M, N, generator=gen).to(dtype)] \
        if "mul" in epilogue else [(1 + 0.5 * torch.randn(N, generator=gen)).to(dtype)] if "gain" in epilogue else []
    return x, y, torch.tensor(index, dtype=torch.long), steps(epilogue, False), operands


def check(index, ranks, dtype, mode, epilogue):
    assert backend("cpu") == "triton-interpreter"     # the kernels run, not the reference twice
    bank = make_bank(ranks, dtype)
    x, y, idx, chain, operands = make_call(index, dtype, epilogue)
    want = region.reference(x, y.clone(), bank, idx, chain, operands)
    got = region.mixed_lora_linear(x, y.clone(), bank, idx, chain, operands, mode=mode)
    assert got.shape == y.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    base = idx < 0                    # "__base__" rows: the epilogue of y alone
    torch.testing.assert_close(got[base], region.epilogue_torch(y, chain, operands)[base], **TOLERANCE[dtype])
    return got, want, y


# ---------------------------------------------------------------- the kernels


@DTYPES
@MODES
@pytest.mark.parametrize("epilogue", EPILOGUES[:2])
def test_ranks_1_and_64_and_an_empty_segment(epilogue, mode, dtype):
    got, want, y = check([1, -1, 0, 1, 0, -1], [1, 64, 3], dtype, mode, epilogue)   # adapter 2: no row
    assert not torch.allclose(got[0].float(), region.epilogue_torch(y, steps(epilogue, False),
                                                                     make_call([0] * 6, dtype, epilogue)[4])[0].float(),
                              atol=1e-3)


@MODES
@pytest.mark.parametrize("adapter", [0, -1])
def test_one_row(adapter, mode):
    check([adapter], [64, 1], torch.float32, mode, EPILOGUES[0])


@MODES
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_every_row_base(epilogue, mode):
    got, want, y = check([-1, -1, -1], [4, 1], torch.float32, mode, epilogue)
    if not epilogue:
        assert torch.equal(got, y)


@DTYPES
@MODES
def test_a_hundred_adapters_and_few_rows(mode, dtype):
    check([99, 0, 57, -1, 99], [1 + (i * 13) % 64 for i in range(100)], dtype, mode, EPILOGUES[1])


def test_the_tile_table_with_base_rows_keeps_the_order():
    index = torch.tensor([2, -1, 0, 2, -1, 2])
    plain, every = kernel.segments(index, 4, 2), region.segments_with_base(index, 4, 2)
    assert torch.equal(plain.order, every.order)
    assert every.tile_adapter.tolist() == [-1, 0, 2, 2] and plain.tile_adapter.tolist() == [0, 2, 2]
    assert every.tile_start.tolist() == [0, 2, 3, 5] and every.tile_end.tolist() == [2, 3, 6, 6]


def test_reference_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    bank = make_bank([2, 5], torch.float32)
    x, y, idx, chain, operands = make_call([1, -1, 0], torch.float32, EPILOGUES[0])
    got = region.mixed_lora_linear(x, y.clone(), bank, idx, chain, operands)
    z = kernel.mixed_lora_reference(x, y, bank, idx)
    assert torch.equal(got, (F.silu(z) * operands[0] + operands[1]) * 0.5)


@pytest.mark.parametrize("epilogue", EPILOGUES[:2])
def test_expand_kernels_compile_for_an_h100_without_a_gpu(monkeypatch, epilogue):
    jit_mode(monkeypatch)
    bgmv, sgmv = region.load_expand(steps(epilogue, False))
    ints = {name: "*i32" for name in ("index_ptr", "rank_ptr", "order_ptr", "tile_adapter_ptr", "tile_start_ptr",
                                      "tile_end_ptr")}
    pointers = {**ints, "scale_ptr": "*fp32"}
    _, _, block_n, block_r = kernel.BGMV_GPU_CONFIG
    block_m, sgmv_n, _, _ = kernel.SGMV_GPU_CONFIG
    assert compile_sm90(bgmv, dict(BLOCK_N=block_n, BLOCK_R=block_r), pointers=pointers, num_warps=4).asm["cubin"]
    assert compile_sm90(sgmv, dict(BLOCK_M=block_m, BLOCK_N=sgmv_n, BLOCK_R=64, DOT_PRECISION="tf32"),
                        pointers=pointers, num_warps=4).asm["cubin"]


# ---------------------------------------------------------------- the region in a mixed graph


class Block(nn.Module):
    """A SwiGLU block with a residual: gate's region grows silu and the gate multiply, down's the residual."""

    def __init__(self, d=12, h=20):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def block_compile(ranks=(2, 4)):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(3, 2, 12)
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["gate", "down"], "rank": ranks[0]},
                         {"name": "b", "type": "lora", "targets": ["gate", "up"], "rank": ranks[1], "alpha": 3}]}
    compiled = surgeon.compile(model, (x,), spec, verify=False)
    randomize_adapters(compiled.module)
    return compiled, x


def lowered_mixed(compiled):
    mixed = serving.build(compiled.module, compiled.ctx)
    result = Lower().run(mixed, compiled.ctx)
    recompile(mixed)
    return mixed, result


def run(compiled, mixed, x, names):
    plan = serving.plan_rows(compiled.ctx.adapters, names, len(names))
    with torch.no_grad():
        return serving.run(compiled.module, mixed, (x,), plan)


def test_fuse_finds_the_regions_of_a_mixed_graph():
    compiled, x = block_compile()
    mixed = serving.build(compiled.module, compiled.ctx)
    code = mixed.code
    regions, rejections = partition(mixed)
    found = {r.name: r for r in regions}
    # Before: linear, MixedSite(plan, x, linear), then the site's consumers. Expected: each site one region;
    # gate grows silu and the multiply by up's output, down the residual add.
    assert {n: (r.kind, r.epilogue()[0], r.adapter) for n, r in found.items()} == {
        "mixed_lora_linear@gate": ("mixed_lora_linear", "silu,mul:0", "a,b"),
        "mixed_lora_linear@up": ("mixed_lora_linear", "", "b"),
        "mixed_lora_linear@down": ("mixed_lora_linear", "add:0", "a")}
    assert found["mixed_lora_linear@gate"].rank == 4 and found["mixed_lora_linear@gate"].parts["bias"] is not None
    assert "already fused into mixed_lora_linear@gate" in dict(rejections)["mixed_lora_linear@up + mul"]
    result = Fuse().run(mixed, compiled.ctx)
    assert mixed.code == code and "3 mixed_lora_linear regions" in result.notes[-1]
    assert "linear+bias+mixed_lora(a,b) -> silu -> mul" in result.notes[0] + result.notes[1] + result.notes[2]


def test_a_site_with_a_route_the_kernels_do_not_take_is_refused():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 2, 12)
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["gate"], "rank": 2},
                         {"name": "s", "type": "ia3", "targets": ["gate"]}]}
    compiled = surgeon.compile(model, (x,), spec, verify=False)
    regions, rejections = partition(serving.build(compiled.module, compiled.ctx))
    assert not regions
    assert any("route 's' (ia3) is not a plain LoRA" in why for _, why in rejections)


def test_lowered_mixed_graph_equals_the_unfused_one_on_the_reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled, x = block_compile()
    states = {n: s.status for n, s in compiled.ctx.adapters.items()}
    user_code = compiled.module.code
    mixed, result = lowered_mixed(compiled)
    assert result.matches == 3 and "3 mixed_lora_linear regions" in result.notes[0]
    assert {n: s.status for n, s in compiled.ctx.adapters.items()} == states   # the compiled module's adapters
    assert compiled.module.code == user_code
    assert not [n for n in mixed.graph.nodes if n.op == "call_module" and n.target.startswith("_mixed_out_")
                and not n.target.endswith("_lowered")]
    unfused = serving.build(compiled.module, compiled.ctx)
    for names in (["a", "__base__", "b"], ["__base__"] * 3, ["b", "b", "b"], ["b", "a"]):
        rows = x[:len(names)]
        want = run(compiled, unfused, rows, names)
        got = run(compiled, mixed, rows, names)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(got, compiled.module(rows, adapter_names=names), rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # every row __base__: the base model
        torch.testing.assert_close(run(compiled, mixed, x, ["__base__"] * 3), compiled.original(x),
                                   rtol=1e-6, atol=1e-6)


def test_a_refused_lowering_warns_and_runs_the_unlowered_graph(monkeypatch):
    from surgeon.errors import SurgeonError
    from surgeon.passes.lower import Lower

    monkeypatch.delenv("TRITON_INTERPRET")
    compiled, x = block_compile()

    def refuse(self, gm, ctx):
        raise SurgeonError("lower: a refusal for the test")

    monkeypatch.setattr(Lower, "run", refuse)
    mixed = serving.build(compiled.module, compiled.ctx)
    with pytest.warns(UserWarning, match=r"not lowered to kernels \(lower: a refusal for the test\); the unlowered"):
        fallback = serving._lowered(mixed, compiled.module, compiled.ctx)
    assert fallback is not mixed and not [n for n in fallback.graph.nodes if str(n.target).endswith("_lowered")]
    names, unlowered = ["a", "__base__", "b"], serving.build(compiled.module, compiled.ctx)
    torch.testing.assert_close(run(compiled, fallback, x, names), run(compiled, unlowered, x, names), rtol=0, atol=0)


@DTYPES
def test_lowered_mixed_graph_runs_the_kernels_under_the_interpreter(dtype, monkeypatch):
    compiled, x = block_compile(ranks=(1, 8))
    if dtype != torch.float32:
        compiled.module.to(dtype)
        x = x.to(dtype)
    launched = []
    real = region._run
    monkeypatch.setattr(region, "_run", lambda *a: launched.append(a[6]) or real(*a))
    mixed, _ = lowered_mixed(compiled)
    unfused = serving.build(compiled.module, compiled.ctx)
    for names in (["a", "__base__", "b"], ["__base__", "__base__", "a"]):
        want = run(compiled, unfused, x, names)
        got = run(compiled, mixed, x, names)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert launched and set(launched) == {"bgmv"}     # 6 rows: decode-sized
    torch.testing.assert_close(run(compiled, mixed, x, ["__base__"] * 3), run(compiled, unfused, x, ["__base__"] * 3),
                               rtol=0, atol=0)        # every row __base__: the graph's own ops


def test_gradients_keep_the_unfused_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled, x = block_compile()
    mixed, _ = lowered_mixed(compiled)
    unfused = serving.build(compiled.module, compiled.ctx)
    plan = serving.plan_rows(compiled.ctx.adapters, ["a", "b", "__base__"], 3)
    grads = []
    for graph in (unfused, mixed):
        compiled.module.zero_grad()
        serving.run(compiled.module, graph, (x,), plan)[0].square().sum().backward()
        grads.append([p.grad.clone() for p in compiled.module.parameters() if p.grad is not None])
    assert grads[0] and len(grads[0]) == len(grads[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


PEFT_CASES = {   # two adapters: different module sets (one shared), ranks, alphas, rsLoRA on one; sites per layer
    "llama": (hf_llama, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
              dict(target_modules=["v_proj", "o_proj", "down_proj"], r=8, lora_alpha=4, use_rslora=True), 4),
    "gpt2": (hf_gpt2, dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
             dict(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=6, use_rslora=True, fan_in_fan_out=True), 2),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_lowered_mixed_graph_matches_peft_mixed_batch(case, tmp_path, monkeypatch):
    """A tiny LLaMA (linear sites) and GPT-2 (Conv1D: addmm on flattened rows, a view after it) with two PEFT
    adapters: the lowered mixed graph against PEFT's own mixed-batch forward (reference path)."""
    peft = pytest.importorskip("peft")
    monkeypatch.delenv("TRITON_INTERPRET")
    factory, first, second, per_layer = PEFT_CASES[case]
    model, args = factory()
    for name, options, seed in (("a", first, 7), ("b", second, 11)):
        peft_lora_checkpoint(model, peft.LoraConfig(lora_dropout=0.0, **options), tmp_path / name, scale=0.3,
                             seed=seed)
    both = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a", adapter_name="a").eval()
    both.load_adapter(tmp_path / "b", adapter_name="b")
    spec = {"adapters": [{"name": n, "from_peft": str(tmp_path / n)} for n in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False}, verify=False)
    sites = [n for n in serving.build(compiled.module, compiled.ctx).graph.nodes if n.op == "call_module"]
    mixed, result = lowered_mixed(compiled)
    calls = [n for n in mixed.graph.nodes if n.op == "call_module"]
    assert len(sites) == per_layer * model.config.num_hidden_layers
    assert len(calls) == len(sites) and all(n.meta["surgeon_region"].startswith("mixed_lora_linear@") for n in calls)
    assert {name for name in mixed.meta["surgeon_kernels"] if name.startswith("mixed_lora_linear@")} == \
        {n.meta["surgeon_region"] for n in calls}
    ids = torch.randint(1, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(3))
    names = ["a", "__base__", "b", "a"]
    plan = serving.plan_rows(compiled.ctx.adapters, names, 4)
    values = compiled.module.meta["surgeon_inputs"].bind((ids,), {"use_cache": False}) \
        if compiled.module.meta.get("surgeon_inputs") is not None else (ids,)
    with torch.no_grad():
        expected = both(ids, adapter_names=names).logits
        got = serving.run(compiled.module, mixed, values, plan)
    got = got.logits if hasattr(got, "logits") else got[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_compiled_modules_mixed_calls_lower_their_regions_where_the_kernels_run(monkeypatch):
    # on CUDA (serving.lowers) a mixed call's graph has its regions lowered; here the interpreter stands in
    assert not serving.lowers(torch.device("cpu"))
    compiled, x = block_compile()
    names = ["a", "__base__", "b"]
    want = run(compiled, serving.build(compiled.module, compiled.ctx), x, names)   # the unfused mixed graph
    launched = []
    real = region._run
    monkeypatch.setattr(region, "_run", lambda *a: launched.append(a[6]) or real(*a))
    monkeypatch.setattr(serving, "lowers", lambda device: True)
    with torch.no_grad():
        got = compiled.module(x, adapter_names=names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert launched and set(launched) == {"bgmv"}
    mixed = serving.mixed_graph(compiled.module, compiled.ctx)
    assert sum(isinstance(m, region.MixedLoraLinear) for m in mixed.modules()) == 3
    assert not [n for n in mixed.graph.nodes if n.op == "call_function" and "pointwise" in str(n.target)]
    with torch.no_grad():   # one adapter for every row: its own forward, the compiled module's set_active output
        torch.testing.assert_close(compiled.module(x, adapter_names=["b"] * 3),
                                   run(compiled, serving.build(compiled.module, compiled.ctx), x, ["b"] * 3),
                                   rtol=1e-6, atol=1e-6)
