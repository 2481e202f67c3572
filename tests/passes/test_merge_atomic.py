"""merge and unmerge are all or nothing per pass call: a refusal that depends on the values at some site
(found only when that site's delta or inverse is computed) is raised, naming adapter and site, before
any site is written, so the graph code, every parameter and the adapters' states are as before the call."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import surgeon
import surgeon.spec
from surgeon.graph import get_tensor
from tests.conftest import hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes

KW = {"use_cache": False}


def snapshot(compiled) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    module = compiled.module
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return module.code, params, {n: s.status for n, s in compiled.adapters.items()}


def assert_unchanged(compiled, before) -> None:
    code, params, statuses = before
    assert compiled.module.code == code
    now = dict(compiled.module.named_parameters())
    assert now.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(now[name].detach(), value), name
    assert {n: s.status for n, s in compiled.adapters.items()} == statuses


def test_unmerge_refused_at_the_second_site_leaves_everything_merged():
    """HiRA's unmerge divides W' by 1 + B A: a zero there (at the second site only) is refused before the
    first site is unmerged."""
    model, args = hf_llama()
    spec = {"adapters": [{"name": "h", "type": "hira", "targets": ["*.q_proj"], "rank": 2}]}
    compiled = surgeon.compile(model, args, spec, KW)
    randomize_adapters(compiled.module, seed=2)
    state = compiled.adapters["h"]
    assert len(state.sites) == 2
    second = state.sites[1]
    with torch.no_grad():   # B A = e_0 e_0^T * -1: 1 + B A is 0 at [0, 0]
        A, B = (get_tensor(compiled.module, second.params[p]) for p in ("hira_A", "hira_B"))
        A.zero_()[0, 0] = 1.0
        B.zero_()[0, 0] = -1.0
    compiled.apply(["merge"])
    before = snapshot(compiled)
    with pytest.raises(surgeon.SpecError) as error:
        compiled.apply(["unmerge"])
    message = str(error.value)
    assert f"cannot unmerge adapter 'h' at '{second.path}'" in message and "1 + B A is 0" in message
    assert_unchanged(compiled, before)
    assert not adapter_nodes(compiled.module, "h") and all(s.merged for s in state.sites)


def test_merge_refused_at_the_second_site_leaves_everything_inserted(monkeypatch):
    """A kind whose delta refuses some values (as deft's or miss's do), at the second of two sites: the
    first is not merged either."""
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, {"adapters": [
        {"name": "a", "type": "lora", "targets": ["*.v_proj"], "rank": 2},
        {"name": "b", "type": "lora", "targets": ["*.q_proj"], "rank": 2}]}, KW)
    randomize_adapters(compiled.module, seed=3)
    table = surgeon.spec.kinds()
    lora = table["lora"]

    def picky(params, opts, weight):
        if params["lora_A"].flatten()[0] == 7.0:
            raise ValueError("lora: a marked value this test refuses")
        return lora.delta_weight(params, opts, weight)

    monkeypatch.setattr(surgeon.spec, "kinds", lambda: {**table, "lora": dataclasses.replace(lora, delta_weight=picky)})
    last = compiled.adapters["b"].sites[1]
    with torch.no_grad():
        get_tensor(compiled.module, last.params["lora_A"])[0, 0] = 7.0
    before = snapshot(compiled)
    nodes = len(adapter_nodes(compiled.module))
    with pytest.raises(surgeon.SpecError, match=f"cannot merge adapter 'b' at '{last.path}': lora: a marked value"):
        compiled.apply(["merge"])
    assert_unchanged(compiled, before)
    assert len(adapter_nodes(compiled.module)) == nodes


def test_stacked_adapters_are_checked_against_the_weight_they_will_see():
    """Two IA3 scales on one weight (their merges compose exactly): the second's delta and inverse are
    checked against W as the first leaves it, and the round trip still gives the base back."""
    model, args = hf_llama()
    spec = {"adapters": [{"name": n, "type": "ia3", "targets": ["*.q_proj"]} for n in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, KW)
    randomize_adapters(compiled.module, seed=4)
    with torch.no_grad():   # scales near 1, as training leaves them
        for name, p in compiled.module.named_parameters():
            if name.endswith("ia3_l"):
                p.add_(1.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled.apply(["merge", "unmerge"])
    for name, value in base.items():
        torch.testing.assert_close(compiled.module.get_parameter(name), value, rtol=0, atol=1e-6)
