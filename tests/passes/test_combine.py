"""combine: merge methods on hand-worked 3x3 deltas, and the pass on a LLaMA-style graph."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from surgeon.passes import _combine_methods as methods
from surgeon.passes.combine import site_delta
from surgeon.pipeline import compare
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits, op_counts

# Two deltas whose top-4 entries (density 0.5 of 9 -> 4 kept) overlap:
#   trim(D1) keeps (0,0)=4, (1,0)=-3, (1,2)=6, (2,1)=-5
#   trim(D2) keeps (0,0)=-5, (1,1)=-2.5, (1,2)=2, (2,1)=8
D1 = torch.tensor([[4.0, -1.0, 0.5], [-3.0, 2.0, 6.0], [1.0, -5.0, 0.2]])
D2 = torch.tensor([[-5.0, 0.1, 0.3], [0.2, -2.5, 2.0], [0.4, 8.0, -0.5]])
W = [0.6, 0.4]


def test_ties_hand_computed():
    # weighted trimmed: (0,0) 2.4 vs -2.0 -> elected +, only D1 agrees -> 2.4/0.6 = 4
    # (1,2) 3.6 and 0.8 agree -> (3.6 + 0.8) / (0.6 + 0.4) = 4.4; (2,1) -3.0 vs 3.2 -> +, 3.2/0.4 = 8
    # (1,0) only D1 -> -3; (1,1) only D2 -> -2.5; everything else was trimmed in both
    expected = torch.tensor([[4.0, 0.0, 0.0], [-3.0, -2.5, 4.4], [0.0, 8.0, 0.0]])
    torch.testing.assert_close(methods.ties([D1, D2], W, density=0.5), expected)


def test_magnitude_prune_and_linear_hand_computed():
    pruned = torch.tensor([[0.4, 0.0, 0.0], [-1.8, -1.0, 4.4], [0.0, 0.2, 0.0]])   # 0.6 trim(D1) + 0.4 trim(D2)
    torch.testing.assert_close(methods.magnitude_prune([D1, D2], W, density=0.5), pruned)
    mixed = torch.tensor([[0.4, -0.56, 0.42], [-1.72, 0.2, 4.4], [0.76, 0.2, -0.08]])
    torch.testing.assert_close(methods.linear([D1, D2], W), mixed)


def test_dare_hand_computed_with_seed_0():
    # torch.rand(3, 3) < 0.5 from Generator().manual_seed(0), drawn for D1 then D2:
    keep1 = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    keep2 = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(methods.drop_and_rescale(D1, 0.5, generator), torch.where(keep1, 2 * D1, 0.0))
    assert torch.equal(methods.drop_and_rescale(D2, 0.5, generator), torch.where(keep2, 2 * D2, 0.0))
    # survivors are doubled (1 / density): 0.6 * 2 D1 + 0.4 * 2 D2 on the kept entries
    dare_linear = torch.tensor([[4.8, 0.08, 0.84], [-3.44, 0.4, 1.6], [1.2, 0.0, 0.24]])
    torch.testing.assert_close(methods.dare_linear([D1, D2], W, density=0.5, seed=0), dare_linear)
    # TIES on the dropped deltas: single agreeing entries keep 2 D_i, (0,2) agrees -> 0.6*1 + 0.4*0.6
    dare_ties = torch.tensor([[8.0, 0.2, 0.84], [-6.0, 4.0, 4.0], [2.0, 0.0, 0.4]])
    torch.testing.assert_close(methods.dare_ties([D1, D2], W, density=0.5, seed=0), dare_ties)
    assert not torch.equal(methods.dare_linear([D1, D2], W, density=0.5, seed=1), dare_linear)


def test_truncate_is_eckart_young():
    factors = methods.truncate(torch.diag(torch.tensor([3.0, 4.0])), rank=1)
    torch.testing.assert_close(factors.B @ factors.A, torch.tensor([[0.0, 0.0], [0.0, 4.0]]))
    assert factors.error == pytest.approx(3.0 / 5.0)      # sqrt(3^2) / sqrt(3^2 + 4^2)


def test_method_schemas_are_their_signatures():
    assert set(methods.schema(methods.linear)) == set()
    assert set(methods.schema(methods.dare_ties)) == {"density", "seed"}
    assert methods.schema(methods.svd)["rank"].default is methods.inspect.Parameter.empty


# ---------------------------------------------------------------- the pass

TWO = {"adapters": [
    {"name": "a", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4, "alpha": 8},
    {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.o_proj"], "rank": 2, "alpha": 2},
], "pipeline": ["insert"]}


def compiled_two():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, TWO, {"use_cache": False})
    randomize_adapters(compiled.module, seed=3)
    return compiled, args


def deltas_of(compiled, name):
    state = compiled.adapters[name]
    return {s.path: site_delta(compiled.module, state, s) for s in state.sites}


def test_combine_linear_of_two_equals_inserting_both():
    compiled, args = compiled_two()
    both = logits(compiled.module, args)
    want = {p: deltas_of(compiled, "a").get(p, 0) + deltas_of(compiled, "b").get(p, 0)
            for p in deltas_of(compiled, "a") | deltas_of(compiled, "b")}
    assert op_counts(compiled.module)["linear"] == 15 + 2 * 8
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "linear", "into": "ab"}}])
    row = compiled.report.rows[-1]
    assert row.matches == 6                               # q, v, o in 2 layers
    assert [compiled.adapters[n].status for n in ("a", "b", "ab")] == ["combined", "combined", "inserted"]
    assert not adapter_nodes(compiled.module, "a") and not adapter_nodes(compiled.module, "b")
    assert op_counts(compiled.module)["linear"] == 15 + 6  # one D x per module instead of B(A x) per adapter
    assert compiled.adapters["ab"].spec.type == "delta"
    ok, detail = compare([both], [logits(compiled.module, args)], "close")
    assert ok, detail
    for path, delta in deltas_of(compiled, "ab").items():
        torch.testing.assert_close(delta, want[path], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rank", [None, 4])
def test_combine_linear_weight_one_of_one_adapter_is_that_adapter(rank):
    compiled, args = compiled_two()
    before = logits(compiled.module, args)
    want = deltas_of(compiled, "a")
    compiled.apply([{"remove": {"adapters": ["b"]}}])
    alone = logits(compiled.module, args)
    options = {"adapters": ["a"], "weights": [1], "into": "a1"} | ({"rank": rank} if rank else {})
    compiled.apply([{"combine": options}])
    got = deltas_of(compiled, "a1")
    assert got.keys() == want.keys()
    for path in want:
        torch.testing.assert_close(got[path], want[path], rtol=1e-5, atol=1e-6)
    ok, detail = compare([alone], [logits(compiled.module, args)], "close")
    assert ok, detail
    assert not torch.equal(before, alone)               # b really was there before
    if rank:
        state = compiled.adapters["a1"]
        assert state.spec.type == "lora" and {s.options["rank"] for s in state.sites} == {4}
        errors = [n for n in compiled.report.rows[-1].notes if "truncation" in n]
        assert len(errors) == 4 and all(float(n.rsplit(" ", 1)[1]) < 1e-5 for n in errors)


def test_ties_with_rank_reports_true_truncation_error_and_merge_unmerge_restores_base():
    compiled, args = compiled_two()
    base = {s.path: get_tensor(compiled.module, s.weight).detach().clone() for s in compiled.adapters["a"].sites}
    inputs = [deltas_of(compiled, "a"), deltas_of(compiled, "b")]
    spec = {"adapters": ["a", "b"], "method": "ties", "weights": [0.6, 0.4], "density": 0.3, "into": "ab", "rank": 2}
    compiled.apply([{"combine": spec}])
    state = compiled.adapters["ab"]
    notes = {n.split(" @ ")[1].split(":")[0]: float(n.rsplit(" ", 1)[1])
             for n in compiled.report.rows[-1].notes if "truncation" in n}
    for site in state.sites:
        full = methods.ties([d.get(site.path, torch.zeros(site.out_features, site.in_features)) for d in inputs],
                            [0.6, 0.4], density=0.3)
        got = site_delta(compiled.module, state, site)
        direct = ((full - got).norm() / full.norm()).item()
        assert notes[site.path] == pytest.approx(direct, rel=1e-3, abs=1e-6)
        assert 0.0 < direct < 1.0
    combined = logits(compiled.module, args)
    compiled.apply([{"merge": {"adapters": ["ab"]}}])        # checked "close" against the graph before
    assert not adapter_nodes(compiled.module, "ab")
    compiled.apply([{"unmerge": {"adapters": ["ab"]}}])
    for site in state.sites:
        if site.path in base:
            torch.testing.assert_close(get_tensor(compiled.module, site.weight), base[site.path],
                                       rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(compiled.module, args), combined, rtol=1e-5, atol=1e-5)


def test_dare_through_the_pass_is_seeded():
    runs = []
    for seed in (0, 0, 1):
        compiled, _ = compiled_two()
        compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "dare_linear", "density": 0.5,
                                     "seed": seed}}])
        runs.append(deltas_of(compiled, "a_b_dare_linear"))
    path = "model.layers.0.self_attn.q_proj"
    assert torch.equal(runs[0][path], runs[1][path])
    assert not torch.equal(runs[0][path], runs[2][path])
    # layers draw their own masks: the two q_proj sites keep different patterns
    layer1 = runs[0]["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(runs[0][path] != 0, layer1 != 0)


@pytest.fixture(scope="module")
def shared_compiled():
    return compiled_two()[0]


@pytest.mark.parametrize("options,message", [
    ({"method": "bogus"}, "unknown method 'bogus'"),
    ({"method": "linear", "density": 0.5}, "method 'linear' takes no 'density'"),
    ({"method": "ties", "seed": 0}, "method 'ties' takes no 'seed'"),
    ({"method": "svd"}, "method 'svd' needs 'rank'"),
    ({"method": "ties", "density": 1.5}, "must be a number in (0, 1]"),
    ({"weights": [1.0]}, "must be 2 numbers"),
    ({"into": "a"}, "an adapter named 'a' already exists"),
    ({"rank": 0}, "must be a positive integer"),
])
def test_bad_options_are_spec_errors(shared_compiled, options, message):
    with pytest.raises(surgeon.SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shared_compiled.apply([{"combine": {"adapters": ["a", "b"], **options}}])
    assert shared_compiled.adapters["a"].status == "inserted"     # refused before touching the graph


def test_kind_without_delta_is_refused_with_its_reason(monkeypatch):
    compiled, _ = compiled_two()
    import surgeon.spec

    table = surgeon.spec.kinds()
    opaque = dataclasses.replace(table["lora"], delta_weight=None, refuse_merge="a tanh sits in its branch")
    monkeypatch.setattr(surgeon.spec, "kinds", lambda: {**table, "lora": opaque})
    with pytest.raises(surgeon.SpecError, match="cannot combine adapter 'a' \\(lora\\): a tanh sits in its branch"):
        compiled.apply([{"combine": {"adapters": ["a", "b"]}}])


def test_gpt2_conv1d_sites_combine_in_out_x_in_layout():
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.c_attn"], "rank": 4},
                         {"name": "b", "type": "lora", "targets": ["*.c_attn", "*.mlp.c_fc"], "rank": 2}]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False})
    randomize_adapters(compiled.module, seed=4)
    both = logits(compiled.module, args)
    compiled.apply([{"combine": {"adapters": ["a", "b"], "rank": 6}}])   # rank a + rank b: exact
    assert {s.op for s in compiled.adapters["a_b_linear"].sites} == {"addmm"}
    ok, detail = compare([both], [logits(compiled.module, args)], "close")
    assert ok, detail


def test_an_adapter_left_out_keeps_running():
    model, args = hf_llama()
    spec = {"adapters": [{"name": n, "type": "lora", "targets": ["*.q_proj"], "rank": 2} for n in ("a", "b", "c")]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False})
    randomize_adapters(compiled.module, seed=6)
    all_three = logits(compiled.module, args)
    compiled.apply([{"combine": {"adapters": ["a", "c"]}}])    # b sits between them on every q_proj
    assert compiled.adapters["b"].status == "inserted" and adapter_nodes(compiled.module, "b")
    ok, detail = compare([all_three], [logits(compiled.module, args)], "close")
    assert ok, detail
