"""activate: several adapters on one graph, switched at run time without recapturing."""
from __future__ import annotations

import torch

import surgeon
from tests.conftest import hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits

KW = {"use_cache": False}


def two_adapters():
    return {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 2},
                         {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 2}],
            "pipeline": ["insert"]}


def test_switch_between_adapters_matches_single_adapter_compiles():
    model, args = hf_llama()
    both = surgeon.compile(model, args, two_adapters(), KW)
    randomize_adapters(both.module)
    weights = {n: both.adapter_weights(n) for n in ("a", "b")}
    both_out = logits(both.module, args)

    both.set_active("a")
    assert {n.meta["surgeon_adapter"] for n in adapter_nodes(both.module)} == {"a"}
    only_a = logits(both.module, args)
    both.set_active("b")
    only_b = logits(both.module, args)
    both.set_active("a", "b")
    torch.testing.assert_close(logits(both.module, args), both_out, rtol=1e-6, atol=1e-6)
    assert both.report.rows[-1].notes == ["active: a, b"]

    for name, expected in (("a", only_a), ("b", only_b)):   # each equals a compile with that adapter alone
        spec = {"adapters": [s for s in two_adapters()["adapters"] if s["name"] == name]}
        single = surgeon.compile(model, args, spec, KW)
        with torch.no_grad():
            for path, params in weights[name].items():
                for p, t in params.items():
                    single.module.get_parameter(f"{path}.adapter_{name}.{p}").copy_(t)
        torch.testing.assert_close(logits(single.module, args), expected, rtol=1e-6, atol=1e-6)


def test_activate_in_spec_then_merge_the_active_one():
    model, args = hf_llama()
    spec = {**two_adapters(), "pipeline": ["insert", {"activate": {"adapters": ["b"]}}, {"merge": {"adapters": ["b"]}}]}
    compiled = surgeon.compile(model, args, spec, KW)
    assert compiled.adapters["a"].status == "inactive" and compiled.adapters["b"].status == "merged"
    assert adapter_nodes(compiled.module) == []
    compiled.set_active("a")
    assert compiled.adapters["a"].status == "inserted" and len(adapter_nodes(compiled.module, "a")) == 2 * 5


def test_set_active_with_no_names_parks_every_adapter():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, two_adapters(), KW)
    randomize_adapters(compiled.module)
    compiled.set_active()
    assert adapter_nodes(compiled.module) == []
    assert {a.status for a in compiled.adapters.values()} == {"inactive"}
    assert torch.equal(logits(compiled.module, args), logits(model, args))
