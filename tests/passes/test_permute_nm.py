"""permute-nm: the channel-permutation search never keeps less than the identity, the permuted
(unmasked) function is unchanged, the mask keeps exactly N of every M, and un-permute inverts it."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgeon
from surgeon.groups.nm import kept, nm_mask, search
from tests.conftest import hf_gpt2, hf_llama, small_cnn
from tests.passes.helpers import logits

KW = {"use_cache": False}


@st.composite
def _problems(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m))
    rows, blocks = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    A = torch.randn(rows, blocks * m, generator=torch.Generator().manual_seed(seed))
    return A, n, m


@settings(max_examples=60, deadline=None)
@given(_problems())
def test_search_never_keeps_less_than_the_identity(problem):
    A, n, m = problem
    order, base, found = search(A, n, m)
    assert sorted(order) == list(range(A.shape[1]))
    assert found >= base
    assert base == kept(A.abs().double(), torch.arange(A.shape[1]), n, m)
    permuted = A[:, order]                        # what the mask really keeps in the permuted layout
    assert float((permuted.abs() * nm_mask(permuted, 1, n, m)).double().sum()) == pytest.approx(found, rel=1e-9)


def test_search_regroups_large_columns():
    A = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0]])    # 2:4 keeps 18 + 2; regrouped 18 + 18
    order, base, found = search(A, 2, 4)
    assert (base, found) == (20.0, 36.0)
    assert sorted(order[:4]) != [0, 1, 2, 3]


def test_nm_mask_keeps_n_largest_per_run():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0, 2.5, -0.1, 4.0]])
    assert nm_mask(w, 1, 2, 4).tolist() == [[False, True, True, False, False, True, False, True]]


def _kept(note: str) -> tuple[float, float]:
    base, found = re.search(r"kept \|w\| ([\d.e+]+) without the permutation, ([\d.e+]+) with it", note).groups()
    return float(base), float(found)


@pytest.mark.parametrize("factory,kwargs,groups", [
    (hf_llama, KW, 2), (hf_gpt2, KW, 2), (small_cnn, None, 1)])
def test_permuted_function_is_unchanged_and_gain_reported(factory, kwargs, groups):
    model, args = factory()
    compiled = surgeon.compile(model, args, {"adapters": [], "pipeline": [{"permute-nm": {"n": 2, "m": 4}}]}, kwargs)
    row = compiled.report.rows[-1]
    assert row.matches == groups and row.check.startswith("rel err")
    base, found = _kept(row.notes[-1])
    assert found > base > 0
    torch.testing.assert_close(logits(compiled.module, args), logits(model, args))
    entries = compiled.module.meta["surgeon_permutations"][-1]["groups"]
    assert len(entries) == groups and all(e["kept"][1] >= e["kept"][0] for e in entries)


def test_mask_keeps_two_of_four_in_the_permuted_layout_and_un_permute_inverts():
    model, args = hf_llama()
    pipeline = [{"permute-nm": {"n": 2, "m": 4, "apply_mask": True}}]
    compiled = surgeon.compile(model, args, {"adapters": [], "pipeline": pipeline}, KW)
    assert compiled.report.rows[-1].check == "changes function"
    entry = compiled.module.meta["surgeon_permutations"][-1]["groups"][0]
    down = compiled.module.get_parameter(entry["group"] + ".down_proj.weight")
    runs = (down != 0).reshape(down.shape[0], -1, 4).sum(-1)
    assert torch.equal(runs, torch.full_like(runs, 2))
    assert float(down.detach().abs().double().sum()) == pytest.approx(entry["kept"][1], rel=1e-9)
    masked = logits(compiled.module, args)
    compiled.apply(["un-permute"])
    original = model.get_parameter(entry["group"] + ".down_proj.weight")
    restored = compiled.module.get_parameter(entry["group"] + ".down_proj.weight")
    assert torch.equal(restored != 0, (original * (restored != 0) != 0))        # zeros went back with their columns
    torch.testing.assert_close(logits(compiled.module, args), masked)
