"""lower: each LoRA region becomes one surgeon::lora_linear call; outputs, PEFT and training agree.

These run on the CPU without TRITON_INTERPRET, so the op runs its torch reference path (the
lower pass says so in its note); tests/kernels covers the Triton kernel itself.
"""
from __future__ import annotations

import copy
import operator

import pytest
import torch

import surgeon
from surgeon.kernels.pointwise_program import Program, broadcast_shape
from tests.conftest import hf_gpt2, hf_llama, lora_spec, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits, op_counts

KW = {"use_cache": False}
LLAMA_TARGETS = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def lowered_llama(layers=2, elementwise=True, spec=None):
    """(model, args, compiled after fuse + lower, a copy of the module before them), adapters randomized."""
    model, args = hf_llama(layers=layers)
    compiled = surgeon.compile(model, args, spec or lora_spec(LLAMA_TARGETS, rank=4, alpha=8), KW)
    randomize_adapters(compiled.module)
    unlowered = copy.deepcopy(compiled.module)
    compiled.apply(["fuse", {"lower": {"elementwise": elementwise}}])
    return model, args, compiled, unlowered


def assert_same_gradients(lowered, unlowered, args, count):
    """One loss, backward through both modules: the same `count` trainable gradients."""
    labels = torch.randint(0, 128, args[0].shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for module in (lowered, unlowered):
        loss = torch.nn.functional.cross_entropy(module(*args).logits.flatten(0, 1), labels.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == count
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_lower_llama_structure_and_outputs():
    model, args, compiled, unlowered = lowered_llama(elementwise=False)
    before, after = op_counts(unlowered), op_counts(compiled.module)
    # Before: per site linear + 2 LoRA linears + add; SwiGLU's silu and mul; residual adds.
    # Expected: 12 fused calls; the LoRA linears, their adds, silu and the SwiGLU mul are gone.
    assert after["surgeon"] == 12                          # torch.ops.surgeon.lora_linear
    assert after["linear"] == before["linear"] - 3 * 12
    assert after["silu"] == 0 and before["silu"] == 2
    assert after["add"] == before["add"] - 12 - 4 and after["mul"] == before["mul"] - 2
    assert [n for n in adapter_nodes(compiled.module) if n.op == "call_function"] == \
        [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    row = compiled.report.rows[-1]
    assert row.name == "lower" and row.matches == 12 and row.check.startswith("rel err")
    assert "elementwise regions are off" in dict(row.rejections)["elementwise@model.norm"]
    assert "reference" in row.notes[0] and "not Triton" in row.notes[0]
    sources = compiled.module.meta["surgeon_kernels"]
    gate = sources["lora_linear@model.layers.1.mlp.gate_proj"]
    assert "def lora_linear_silu_mul_kernel(" in gate and "mul_" in gate and "model.layers.1.mlp.act_fn" in gate


def test_lower_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model, args, compiled, _ = lowered_llama(layers=1)
    compiled.save_adapter("chat", tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        expected = loaded(*args, **KW).logits
    torch.testing.assert_close(logits(compiled.module, args), expected, rtol=1e-5, atol=1e-5)


def test_training_step_on_lowered_module_matches_unlowered():
    _, args, compiled, unlowered = lowered_llama(layers=1)
    labels = torch.randint(0, 128, args[0].shape, generator=torch.Generator().manual_seed(5))
    results = []
    for module in (compiled.module, unlowered):
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        out = module(*args).logits
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        optimizer.step()
        with torch.no_grad():
            results.append((loss.detach(), grads, module(*args).logits))
    (loss_l, grads_l, next_l), (loss_u, grads_u, next_u) = results
    torch.testing.assert_close(loss_l, loss_u, rtol=1e-6, atol=1e-6)
    assert grads_l.keys() == grads_u.keys() and len(grads_l) == 12
    for name in grads_u:
        torch.testing.assert_close(grads_l[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads_u.values())
    torch.testing.assert_close(next_l, next_u, rtol=1e-5, atol=1e-5)


def test_lower_gpt2_conv1d_and_export():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_attn", "*.c_fc"]), KW)
    randomize_adapters(compiled.module)
    expected = logits(compiled.module, args)
    compiled.apply(["lower"])                          # without fuse: lower partitions on its own
    calls = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    assert len(calls) == 4 and all(n.args[7] == "in_out" and n.args[2] is not None for n in calls)
    reasons = dict(compiled.report.rows[-1].rejections)
    assert any("no epilogue rule" in why for why in reasons.values())     # reported when fuse did not run
    torch.testing.assert_close(logits(compiled.module, args), expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(compiled.module, args)
    assert sum(n.target is torch.ops.surgeon.lora_linear.default for n in exported.graph.nodes) == 4
    torch.testing.assert_close(exported.module()(*args).logits, expected, rtol=1e-5, atol=1e-5)


def test_lower_with_nothing_to_lower_changes_nothing():
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, {"adapters": []}, KW)
    before = compiled.module.code
    compiled.apply([{"lower": {"elementwise": False}}])
    assert compiled.module.code == before and compiled.report.rows[-1].matches == 0
    assert compiled.module.meta["surgeon_kernels"] == {}
    compiled.apply(["lower"])                         # without adapters only the pointwise groups remain
    assert {n.target for n in compiled.module.graph.nodes if "surgeon" in str(n.target)} == \
        {torch.ops.surgeon.pointwise.default}


def test_op_is_registered_by_lower_not_by_import_surgeon():
    import subprocess
    import sys

    code = ("import sys, torch, surgeon; from surgeon.passes import passes; passes(); "
            "print('surgeon.kernels.registry' in sys.modules, hasattr(torch.ops.surgeon, 'lora_linear'), "
            "hasattr(torch.ops.surgeon, 'bottleneck'), hasattr(torch.ops.surgeon, 'pointwise'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"] * 4, result.stderr


def test_lowered_adapters_refuse_graph_edits_and_kernels_are_saved(tmp_path):
    model, args, compiled, _ = lowered_llama(layers=1)
    assert compiled.adapters["chat"].status == "lowered"
    assert set(compiled.kernels) == set(compiled.module.meta["surgeon_kernels"]) and len(compiled.kernels) == 6 + 7
    with pytest.raises(surgeon.PassError, match="pass 'merge'.*lowered into kernels"):
        compiled.apply(["merge"])
    out = compiled.save(tmp_path)
    assert len(list((out / "kernels").glob("*.py"))) == 6 + 7
    from surgeon.cli import main

    assert main(["show", str(out), "--kernels"]) == 0
    assert (out / "adapters" / "chat" / "adapter.safetensors").is_file()


def test_lower_dora_ia3_bottleneck_parallel_and_train():
    from tests.passes.test_fuse import FAMILY

    _, args, compiled, unlowered = lowered_llama(layers=1, spec=FAMILY)
    ops = [n.target for n in compiled.module.graph.nodes if n.op == "call_function"]
    # Before: DoRA's 8 nodes, IA3's mul x2, each bottleneck's down/act/up/add. Expected: 3 lora_linear
    # calls (DoRA with a gain, two IA3 linears without LoRA), 2 bottleneck calls, no adapter node left.
    assert ops.count(torch.ops.surgeon.lora_linear.default) == 3
    assert ops.count(torch.ops.surgeon.bottleneck.default) == 2
    aten = torch.ops.aten
    left = {n.target for n in adapter_nodes(compiled.module) if n.op == "call_function"} - \
        {torch.ops.surgeon.lora_linear.default, torch.ops.surgeon.bottleneck.default}
    assert left == {aten.mm.default, aten.add.Tensor, aten.linalg_vector_norm.default, aten.detach.default,
                    aten.div.Tensor}                     # DoRA's gain m / ||W + s B A||, from weights only
    kernels = compiled.module.meta["surgeon_kernels"]
    assert "def linear_gain_silu_mul_kernel(" in kernels["lora_linear@model.layers.0.mlp.gate_proj"]
    assert "def bottleneck_gelu_add_kernel(" in kernels["bottleneck@model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    assert_same_gradients(compiled.module, unlowered, args, 3 + 2 + 2 * 2)
    exported = torch.export.export(compiled.module, args)
    torch.testing.assert_close(exported.module()(*args).logits, logits(unlowered, args), rtol=1e-5, atol=1e-5)


def test_lower_elementwise_groups_into_pointwise_calls():
    model, args, compiled, unlowered = lowered_llama(layers=1)
    pointwise = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.pointwise.default]
    # Before: RMSNorm's to/pow/mean/add/rsqrt/mul/to/mul, rotary's cos*scale, sin*scale, q*cos + rot(q)*sin.
    # Expected (one layer): each of the 3 norms one row kernel (the mean over the last dim inside it),
    # cos and sin groups, q and k rotary groups; to_2's int64 position input has no rule (reported by
    # fuse); the SwiGLU mul is inside gate_proj's region.
    assert len(pointwise) == 7
    norm = next(n for n in pointwise if n.meta["surgeon_region"] == "elementwise@model.norm")
    assert [u.target for u in norm.users] == [operator.getitem]
    layer_norm = next(n for n in pointwise if n.meta["surgeon_region"] == "elementwise@model.layers.0.input_layernorm")
    assert sorted(u.args[1] for u in layer_norm.users) == [0, 1]      # x in fp32 (the residual reads it), the norm
    source = compiled.module.meta["surgeon_kernels"]["elementwise@model.norm"]
    assert "rsqrt" in source and "def rows_" in source and "tl.reduce(" in source
    rotary = compiled.module.meta["surgeon_kernels"]["elementwise@model.layers.0.self_attn"]
    assert "def pointwise_" in rotary
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    exported = torch.export.export(compiled.module, args)
    assert sum(n.target is torch.ops.surgeon.pointwise.default for n in exported.graph.nodes) == 7


def test_lower_gpt2_views_dropouts_and_gelu_groups_keep_the_outputs():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_proj", "*.c_fc"]), KW)
    randomize_adapters(compiled.module)
    unlowered = copy.deepcopy(compiled.module)
    compiled.apply(["fuse", "lower"])
    calls = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    # the view a region grew through comes back after the call; the residual add is inside the call
    assert len(calls) == 6 and all(next(iter(n.users)).target is torch.ops.aten.view.default for n in calls)
    assert sum(n.args[8] == "add:0" for n in calls) == 4 and sum(bool(n.args[9]) for n in calls) == 2   # c_fc: GELU
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    exported = torch.export.export(compiled.module, args)
    torch.testing.assert_close(exported.module()(*args).logits, logits(unlowered, args), rtol=1e-5, atol=1e-5)


def test_lower_ia3_input_and_output_scales_and_train():
    from tests.passes.test_fuse import IA3

    _, args, compiled, unlowered = lowered_llama(layers=1, spec=IA3)
    calls = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    assert sorted(n.args[8] for n in calls) == ["gain:0", "gain:0", "x_gain:0|add:1"]
    assert not [n for n in adapter_nodes(compiled.module) if n.target is torch.ops.aten.mul.Tensor]
    assert "def linear_xgain_add_kernel(" in compiled.kernels["lora_linear@model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    assert_same_gradients(compiled.module, unlowered, args, 3)


def test_lower_keeps_q_and_k_rotary_apart_when_their_head_counts_differ():
    """surgeon's TinyLlama (GQA 4/2 heads) shares cos and sin between q's and k's rotary ops; one
    pointwise grid cannot cover both (shapes (2, 4, T, D) and (2, 2, T, D) do not broadcast)."""
    from surgeon.models import tiny_llama

    model, args, *rest = tiny_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.v_proj"]), *rest)
    expected = compiled.module(*args)
    compiled.apply(["fuse", "lower"])
    programs = [Program.decode(n.args[1]) for n in compiled.module.graph.nodes
                if n.target is torch.ops.surgeon.pointwise.default]
    assert programs and all(broadcast_shape([v.shape for v in p.values()]) for p in programs)
    torch.testing.assert_close(compiled.module(*args), expected, rtol=1e-5, atol=1e-5)


# every adapter kind: minimal options and the GEMM regions its sites become (None: its sites stay
# eager, reported; its model's pointwise groups are still lowered)
KIND_REGIONS = {
    "lora": ({"rank": 4}, "lora_linear"), "dora": ({"rank": 4}, "lora_linear"), "ia3": ({}, "lora_linear"),
    "bottleneck": ({"rank": 4}, "bottleneck"), "parallel-adapter": ({"rank": 4}, "bottleneck"),
    "lora-xs": ({"rank": 4}, "lora_linear"), "loha": ({"rank": 2}, "lora_linear"), "lokr": ({"rank": 2}, None),
    "vera": ({"rank": 4}, "lora_linear"), "oft": ({"block_size": 4}, None), "boft": ({"block_size": 4}, "lora_linear"),
    "hra": ({"rank": 4}, None), "shira": ({"rank": 4}, None), "hydra": ({"rank": 4}, None), "delta": ({}, None),
    "prefix": ({"num_virtual_tokens": 2}, None), "s2ft": ({"columns": 4}, None),
    "prompt_tuning": ({"num_virtual_tokens": 2}, None), "p_tuning": ({"num_virtual_tokens": 2}, None),
    "multitask_prompt_tuning": ({"num_virtual_tokens": 2, "num_ranks": 2}, None), "cpt": ({"cpt_token_ids": [3, 7]}, None),
    "adaption_prompt": ({"adapter_len": 2}, None),
    "ether": ({"blocks": 2}, None), "ether_plus": ({"blocks": 2}, None),
    "rosa": ({"rank": 4}, None), "lori": ({"rank": 4}, "lora_linear"),
    "road": ({"group_size": 16}, None), "fourierft": ({"frequencies": 32}, None),
    "hira": ({"rank": 4}, None), "miss": ({"rank": 8}, None), "randlora": ({"rank": 8}, "lora_linear"),
    "delora": ({"rank": 4}, None), "gralora": ({"rank": 4}, None), "c3a": ({"block_size": 16}, None),
    "pvera": ({"rank": 4}, None),
    "vblora": ({"rank": 4, "vector_length": 16, "num_vectors": 32}, None),
    "tinylora": ({"rank": 2, "u": 4}, "lora_linear"), "unilora": ({"rank": 4, "theta_length": 64}, "lora_linear"),
    "waveft": ({"frequencies": 24}, None), "frod": ({"sparse_rate": 0.02}, None), "psoft": ({"rank": 4}, None),
    "deft": ({"rank": 4}, None), "osf": ({}, None), "glora": ({"rank": 2}, None), "lily": ({"rank": 4}, None),
    "adalora": ({"rank": 4}, "lora_linear"), "peanut": ({"rank": 4, "depth": 1}, None),
    "supertuning": ({"sparsity": 0.95}, None), "beft": ({}, None), "adamss": ({"rank": 4, "num_subspaces": 2}, None),
    "ln_tuning": ({}, None), "trainable_tokens": ({"token_indices": [1, 5]}, None),
    "poly": ({"rank": 4, "n_skills": 2, "n_splits": 2}, None),
    # experts mixed per token by scalings from its scaling pass: no fused region, its nodes run eagerly
    "xlora": ({"rank": 4, "n_experts": 2, "xlora_depth": 2, "xlora_size": 16}, None),
}
# kinds whose sites are not the linear projections
KIND_TARGETS = {"prefix": ["*.self_attn"], "adaption_prompt": ["*.self_attn"], "ln_tuning": ["*.input_layernorm"], "trainable_tokens": ["*.embed_tokens"], "prompt_tuning": ["*.embed_tokens"], "p_tuning": ["*.embed_tokens"], "multitask_prompt_tuning": ["*.embed_tokens"], "cpt": ["*.embed_tokens"]}


def test_every_adapter_kind_lowers_and_keeps_the_function():
    from surgeon.adapters import kinds

    assert set(KIND_REGIONS) == set(kinds())
    for kind, (options, region) in KIND_REGIONS.items():
        model, args = hf_llama(layers=1)
        targets = KIND_TARGETS.get(kind, ["*.q_proj", "*.down_proj"])
        spec = {"adapters": [{"name": "a", "type": kind, "targets": targets, **options}], "pipeline": ["insert"]}
        compiled = surgeon.compile(model, args, spec, KW)
        randomize_adapters(compiled.module)
        expected = logits(compiled.module, args)
        compiled.apply(["fuse", "lower"])
        ops = (("lora_linear", torch.ops.surgeon.lora_linear.default),
               ("bottleneck", torch.ops.surgeon.bottleneck.default))
        counts = {k: sum(n.target is op for n in compiled.module.graph.nodes) for k, op in ops}
        assert counts == {k: 2 if k == region else 0 for k in counts}, (kind, counts)
        torch.testing.assert_close(logits(compiled.module, args), expected, rtol=1e-5, atol=1e-5, msg=kind)


def test_lowered_module_runs_under_torch_compile():
    """All three custom ops (fake implementations, list outputs) trace in one graph under torch.compile."""
    from tests.passes.test_fuse import FAMILY

    _, args, compiled, _ = lowered_llama(layers=1, spec=FAMILY)
    ops = {n.target for n in compiled.module.graph.nodes}
    assert {torch.ops.surgeon.lora_linear.default, torch.ops.surgeon.bottleneck.default,
            torch.ops.surgeon.pointwise.default} <= ops
    expected = logits(compiled.module, args)
    fast = torch.compile(compiled.module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(*args).logits, expected, rtol=1e-5, atol=1e-5)


def test_lower_and_fuse_again_change_nothing():
    _, args, compiled, _ = lowered_llama(layers=1)
    code = compiled.module.code
    compiled.apply(["lower", "fuse"])
    assert [row.matches for row in compiled.report.rows[-2:]] == [0, 0] and compiled.module.code == code
    assert compiled.adapters["chat"].status == "lowered"


def test_lower_vera_and_train():
    spec = {"adapters": [{"name": "v", "type": "vera", "rank": 4, "targets": ["*.q_proj", "*.down_proj"]}],
            "pipeline": ["insert"]}
    _, args, compiled, unlowered = lowered_llama(layers=1, spec=spec)
    calls = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    assert len(calls) == 2 and all(n.args[8].startswith("vera_d:0,vera_b:1|") for n in calls)
    assert "def lora_linear_verad_verab_" in compiled.kernels["lora_linear@model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    assert_same_gradients(compiled.module, unlowered, args, 2 * 2)      # d and b per site (A, B frozen)


def test_lower_lora_xs_and_train():
    spec = {"adapters": [{"name": "x", "type": "lora-xs", "rank": 4, "targets": ["*.q_proj", "*.down_proj"]}],
            "pipeline": ["insert"]}
    _, args, compiled, unlowered = lowered_llama(layers=1, spec=spec)
    calls = [n for n in compiled.module.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    # Before: y, A x, R (A x), B (.), add(alpha=s). Expected: one call per site, R as prologue operand 0.
    assert len(calls) == 2 and all(n.args[8].startswith("xs_r:0|") for n in calls)
    assert "((x @ A^T) @ R^T) @ B^T" in compiled.kernels["lora_linear@model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(logits(compiled.module, args), logits(unlowered, args), rtol=1e-5, atol=1e-5)
    assert_same_gradients(compiled.module, unlowered, args, 2)          # R per site (A, B frozen)
