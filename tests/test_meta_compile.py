"""Structure-only compile: a model built on the meta device is captured and rewritten without reading
weight data (surgeon.compile's docstring, docs/large_models.md)."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.errors import PassError

from .conftest import SmallCNN, hf_gpt2, hf_llama, small_cnn

LLAMA_TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def _on_meta(build):
    """The model `build` makes, built again under torch.device("meta") (same config, no data)."""
    real, inputs = build()[:2]
    with torch.device("meta"):
        meta = type(real)(real.config) if hasattr(real, "config") else type(real)()
    return real, inputs, meta.eval(), tuple(torch.empty_like(t, device="meta") for t in inputs)


def _spec(targets, pipeline=("insert",), kind="lora", **options):
    return {"adapters": [{"name": "a", "type": kind, "targets": list(targets), "rank": 4, **options}],
            "pipeline": list(pipeline)}


def _counts(compiled) -> dict:
    """Sites, adapter nodes and the graph's ops by target, `aten.contiguous` left out: the meta device's
    attention kernel returns another memory layout than the CPU's, so a LLaMA captured on meta keeps one
    (value-preserving) `contiguous` per layer that the CPU capture elides as a no-op."""
    gm = compiled.module
    ops: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module") and node.target is not torch.ops.aten.contiguous.default:
            ops[str(node.target)] = ops.get(str(node.target), 0) + 1
    return {"sites": len(compiled.adapters["a"].sites),
            "site_paths": sorted(s.path for s in compiled.adapters["a"].sites),
            "adapter_nodes": sum(1 for n in gm.graph.nodes if n.meta.get("surgeon_adapter") == "a"),
            "inserted_ops": compiled.report.rows[1].nodes[1] - compiled.report.rows[1].nodes[0],
            "ops": ops}


CASES = {
    "llama_gqa": (hf_llama, LLAMA_TARGETS, "attention_mask"),
    "gpt2": (hf_gpt2, ["*.c_attn", "*.c_proj", "*.c_fc"], "attention_mask"),
    "cnn": (small_cnn, ["stem.0", "block1.0", "block1.3", "head"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_compile_has_a_real_compiles_sites_and_materializes_nothing(case):
    build, targets, mask = CASES[case]
    real, inputs, meta, meta_inputs = _on_meta(build)
    # the same inputs on both sides: a meta compile cannot probe optional inputs (it compares outputs), so a
    # tokenizer's mask is passed explicitly to both
    kwargs = {mask: torch.ones(inputs[0].shape, dtype=torch.long)} if mask else None
    meta_kwargs = {mask: torch.ones(inputs[0].shape, dtype=torch.long, device="meta")} if mask else None
    expected = surgeon.compile(real, inputs, _spec(targets), kwargs)
    compiled = surgeon.compile(meta, meta_inputs, _spec(targets), meta_kwargs)

    assert _counts(compiled) == _counts(expected)
    assert compiled.structure_only and not expected.structure_only
    gm = compiled.module
    base = {n: t for n, t in (*gm.named_parameters(), *gm.named_buffers()) if ".adapter_a." not in n}
    assert base and all(t.is_meta for t in base.values()), [n for n, t in base.items() if not t.is_meta]
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))   # the user's model is left as it was
    # adapter parameters: real tensors, drawn from the spec's seed as the real compile drew them
    assert compiled.adapter_weights("a").keys() == expected.adapter_weights("a").keys()
    for path, params in compiled.adapter_weights("a").items():
        for name, tensor in params.items():
            assert not tensor.is_meta and tensor.device.type == "cpu"
            torch.testing.assert_close(tensor, expected.adapter_weights("a")[path][name], rtol=0, atol=0)
    assert [row.check for row in compiled.report.rows] == ["skipped (meta weights)"] * 2
    assert any(note.startswith("structure only:") for note in compiled.report.rows[0].notes)


def test_meta_compile_of_llama_without_a_mask_has_the_same_sites():
    real, inputs, meta, meta_inputs = _on_meta(hf_llama)
    expected = surgeon.compile(real, inputs, _spec(LLAMA_TARGETS))
    compiled = surgeon.compile(meta, meta_inputs, _spec(LLAMA_TARGETS))   # verify defaults on: skipped, said so
    mine, theirs = _counts(compiled), _counts(expected)
    assert (mine["sites"], mine["site_paths"], mine["adapter_nodes"]) == \
        (theirs["sites"], theirs["site_paths"], theirs["adapter_nodes"])
    assert mine["sites"] == 7 * 2
    with pytest.raises(surgeon.SurgeonError, match="structure-only compile"):
        compiled.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize("pipeline, build, targets", [
    (["insert", "merge"], hf_llama, LLAMA_TARGETS),
    (["insert", "merge"], hf_gpt2, ["*.c_attn"]),
    (["fold-bn"], small_cnn, ["head"]),
])
def test_a_pass_that_needs_weight_values_is_refused_on_meta(pipeline, build, targets):
    _, _, meta, meta_inputs = _on_meta(build)
    with pytest.raises(PassError, match=rf"pass '{pipeline[-1]}': it needs the weights' values.*meta device"):
        surgeon.compile(meta, meta_inputs, _spec(targets, pipeline))
    compiled = surgeon.compile(meta, meta_inputs, _spec(targets))
    with pytest.raises(PassError, match="structure-only compile"):
        compiled.apply(pipeline[1:] or pipeline)
    assert all(t.is_meta for n, t in compiled.module.named_parameters() if ".adapter_a." not in n)


def test_merge_plan_on_meta_names_every_site_without_computing():
    real, inputs, meta, meta_inputs = _on_meta(hf_llama)
    compiled = surgeon.compile(meta, meta_inputs, _spec(LLAMA_TARGETS))
    plan = compiled.merge_plan()
    assert [step["site"] for step in plan] == [s.path for s in compiled.adapters["a"].sites]
    q = next(step for step in plan if step["site"] == "model.layers.0.self_attn.q_proj")
    assert q == {"adapter": "a", "kind": "lora", "site": "model.layers.0.self_attn.q_proj", "op": "linear",
                 "weight": "model.layers.0.self_attn.q_proj.weight",
                 "replaces": "model.layers.0.self_attn.q_proj.weight", "shape": [64, 64], "dtype": "float32",
                 "delta_from": ["lora_A", "lora_B"], "bias_mapped": False, "refusal": None}
    # the real compile's merge changes exactly the planned weights
    compiled_real = surgeon.compile(real, inputs, _spec(LLAMA_TARGETS))
    before = dict(compiled_real.module.named_parameters())
    compiled_real.apply(["merge"])
    changed = {n for n, p in compiled_real.module.named_parameters() if n in before and p is not before[n]}
    assert changed == {step["weight"] for step in plan}


def test_a_kind_initialized_from_the_weights_values_keeps_those_on_meta_and_says_so():
    _, _, meta, meta_inputs = _on_meta(hf_llama)
    compiled = surgeon.compile(meta, meta_inputs, _spec(["*.q_proj"], kind="dora"))
    params = compiled.adapter_weights("a")["model.layers.0.self_attn.q_proj"]
    assert {n: t.is_meta for n, t in params.items()} == {"lora_A": False, "lora_B": False, "lora_magnitude": True}
    note = next(n for n in compiled.report.rows[-1].notes if "meta device" in n)
    assert "lora_magnitude" in note and "2 sites" in note


def test_a_real_model_is_unaffected():
    model, inputs = small_cnn()
    compiled = surgeon.compile(model, inputs, _spec(["head"], ["insert", "merge"]))
    assert [row.check for row in compiled.report.rows][1:] == ["exact", compiled.report.rows[2].check]
    assert compiled.report.rows[2].check.startswith("rel err")
    assert not compiled.structure_only and isinstance(SmallCNN(), torch.nn.Module)
