"""mosa-merge: a MoSA adapter's modules folded into one plain adapter, same outputs bit for bit."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters.mosa import draw, select
from surgeon.errors import PassError, SpecError
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits, op_counts

KW = {"use_cache": False}


def lora(name="ad", mosa=3, **options):
    return {"name": name, "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4, "mosa_modules": mosa,
            **options}


def compile_with(model, args, *adapters, pipeline=("insert",)):
    return surgeon.compile(model, args, {"adapters": list(adapters), "pipeline": list(pipeline)}, KW)


def mosa_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (draw, select)]


def adapter_ops(gm, name="ad") -> list[str]:
    return [str(n.target) for n in adapter_nodes(gm, name)]


def branch(compiled, name="ad") -> list[str]:
    """The first site's adapter nodes in graph order, short: 'get_attr lora_A', 'select', 'linear.default' ..."""
    site = compiled.adapters[name].sites[0]
    return [f"get_attr {n.target.rsplit('.', 1)[-1]}" if n.op == "get_attr" else getattr(n.target, "__name__", "?")
            for n in compiled.module.graph.nodes if n.name in site.nodes]


BEFORE = ["get_attr lora_A", "get_attr lora_B", "get_attr mosa_lora_A", "get_attr mosa_lora_B", "get_attr training",
          "draw", "select", "select", "dropout.default", "linear.default", "linear.default", "add.Tensor"]
EXPECTED = ["get_attr lora_A", "get_attr lora_B", "get_attr training",
            "dropout.default", "linear.default", "linear.default", "add.Tensor"]


def test_fold_leaves_the_plain_lora_graph_and_the_same_outputs():
    model, args = hf_llama(layers=1)
    compiled = compile_with(model, args, lora(dropout=0.1))
    randomize_adapters(compiled.module)
    gm = compiled.module
    before = logits(gm, args)
    counts = op_counts(gm)
    assert len(mosa_nodes(gm)) == 3 * 2                     # per site: one draw, a select of A and of B
    trained = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert branch(compiled) == BEFORE

    compiled.apply([{"mosa-merge": {"adapters": ["ad"]}}])
    assert branch(compiled) == EXPECTED                     # the training flag stays: the dropout reads it
    row = compiled.report.rows[-1]
    assert (row.name, row.matches, row.check) == ("mosa-merge", 2, "exact")
    assert torch.equal(logits(gm, args), before)
    assert mosa_nodes(gm) == []
    assert op_counts(gm) == {k: v for k, v in counts.items()                        # no other op changed
                            if not k.startswith(("<function draw ", "<function select "))}
    assert not [n for n, _ in gm.named_parameters() if "mosa" in n]
    assert {n: p for n, p in gm.named_parameters() if p.requires_grad} == trained   # the same Parameter objects
    state = compiled.adapters["ad"]
    assert state.spec.options["mosa_modules"] == 1 and all(s.options["mosa_modules"] == 1 for s in state.sites)
    assert all(set(s.params) == {"lora_A", "lora_B"} for s in state.sites)

    plain = compile_with(model, args, lora(mosa=1, dropout=0.1))
    assert adapter_ops(gm) == adapter_ops(plain.module)      # node for node the plain kind's branch
    assert branch(plain) == EXPECTED
    with torch.no_grad():
        for name, p in plain.module.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    assert torch.equal(logits(plain.module, args), before)
    gm.train()
    torch.manual_seed(0)                                     # the dropout still follows the mode: same draws
    with torch.no_grad():
        got = gm(*args).logits
    plain.module.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(got, plain.module(*args).logits)
        assert not torch.equal(got, before)


def test_after_the_fold_merge_and_save_see_a_plain_lora(tmp_path):
    model, args = hf_gpt2()
    spec = {"name": "ad", "type": "bottleneck", "targets": ["*.mlp.c_proj"], "rank": 2, "mosa_modules": 4,
            "activation": "none"}
    compiled = compile_with(model, args, spec, lora("lo", targets=["*.c_attn"], mosa=2),
                            pipeline=["insert", "mosa-merge"])
    assert {r.name: r.matches for r in compiled.report.rows}["mosa-merge"] == 2 + 2   # both adapters, 2 sites each
    assert compiled.adapters["ad"].spec.options["mosa_modules"] == 1
    randomize_adapters(compiled.module)
    expected = logits(compiled.module, args)
    compiled.save_adapter("lo", tmp_path / "lo")
    again = compile_with(model, args, {"name": "again", "from_dir": str(tmp_path / "lo")})
    assert again.adapters["again"].spec.options["mosa_modules"] == 1
    assert "mosa" not in str([n for n, _ in again.module.named_parameters()])
    compiled.apply([{"merge": {"adapters": ["lo"]}}])
    torch.testing.assert_close(logits(compiled.module, args), expected, rtol=1e-5, atol=1e-5)


def test_an_inactive_adapter_is_folded_and_reattaches_plain():
    model, args = hf_llama(layers=1)
    compiled = compile_with(model, args, lora("a"), lora("b", mosa=1),
                            pipeline=["insert", {"activate": {"adapters": ["b"]}}])
    compiled.apply([{"mosa-merge": {"adapters": ["a"]}}])
    assert all(set(s.parked) == {"lora_A", "lora_B"} for s in compiled.adapters["a"].sites)
    compiled.set_active("a", "b")
    assert mosa_nodes(compiled.module) == []
    assert not [n for n, _ in compiled.module.named_parameters() if "mosa" in n]


def test_nothing_to_fold_and_a_named_plain_adapter_are_refused():
    model, args = hf_llama(layers=1)
    compiled = compile_with(model, args, lora("a"), lora("b", mosa=1))
    with pytest.raises(SpecError, match=r"\['b'\] have no MoSA modules"):
        compiled.apply([{"mosa-merge": {"adapters": ["a", "b"]}}])
    assert compiled.adapters["a"].sites[0].options["mosa_modules"] == 3     # refused before any change
    compiled.apply(["mosa-merge"])                                            # default: every MoSA adapter
    with pytest.raises(PassError, match="no adapter with mosa_modules > 1 to fold"):
        compiled.apply(["mosa-merge"])


def test_the_folded_lora_exports_to_peft_with_peft_s_outputs(tmp_path):
    from tests.adapters.helpers import peft_export

    model, args = hf_llama(layers=1)
    compiled = compile_with(model, args, lora(), pipeline=["insert", "mosa-merge"])
    peft_export(compiled, model, args, tmp_path)        # PEFT loads the plain LoRA; outputs match PEFT's


def test_an_unfolded_mosa_lora_exports_its_dense_eval_adapter_to_peft(tmp_path):
    from tests.adapters.helpers import peft_export

    model, args = hf_llama(layers=1)
    compiled = compile_with(model, args, lora())        # not folded: the module assignments are not written
    compiled.module.eval()
    peft_export(compiled, model, args, tmp_path)        # PEFT's outputs equal surgeon's eval (dense) outputs
