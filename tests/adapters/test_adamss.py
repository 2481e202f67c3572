"""AdaMSS: low-rank updates inside k-means clusters of W's SVD; init equal to PEFT's layer, exact merge
(weight and bias column), PEFT import with PEFT's outputs before and after merge, export back.

PEFT clusters with scikit-learn's KMeans, which this environment lacks: the PEFT tests install a
stand-in `sklearn.cluster.KMeans` that records every call (its arguments and the rows it is given)
and labels by surgeon's own k-means, so PEFT and surgeon cluster alike and the tests check that
surgeon's `clustering: sklearn` calls KMeans exactly as PEFT does; everything after the clustering
(SVD, ranks, QR init, scatter, merge) is compared with PEFT's own code.
"""
from __future__ import annotations

import copy
import importlib.machinery
import sys
import types

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.adapters.adamss import kmeans, subspaces_of
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_round_trip,
                                    assert_trains, compile_kind, peft_export, peft_parity, randomized_peft_checkpoint)
from tests.conftest import hf_gpt2
from tests.passes.helpers import logits


class RecordingKMeans:
    """A stand-in for sklearn.cluster.KMeans: records (arguments, rows); labels by surgeon's k-means."""

    calls: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def fit_predict(self, rows):
        RecordingKMeans.calls.append((self.kwargs, rows.copy()))
        return kmeans(torch.from_numpy(rows), self.kwargs["n_clusters"], seed=5).numpy()


@pytest.fixture
def sklearn_stub(monkeypatch):
    RecordingKMeans.calls = []
    package, cluster = types.ModuleType("sklearn"), types.ModuleType("sklearn.cluster")
    package.__spec__ = importlib.machinery.ModuleSpec("sklearn", None)
    cluster.__spec__ = importlib.machinery.ModuleSpec("sklearn.cluster", None)
    package.cluster, cluster.KMeans = cluster, RecordingKMeans
    monkeypatch.setitem(sys.modules, "sklearn", package)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", cluster)
    return RecordingKMeans


def _count(site) -> int:
    """sum r_i (R + |I_i|) from the site's clusters."""
    R = min(site.options["rank"], site.out_features, site.in_features + int(site.options["biased"]))
    return sum(r * (R + len(rows)) for rows, r in zip(site.options["subspaces"], site.options["ranks"]))


def test_adamss_lifecycle(tmp_path):
    model, args, compiled = compile_kind("adamss", ["*.k_proj", "*.down_proj"], rank=8, num_subspaces=3,
                                         subspace_rank=2)
    assert_identity_insert(compiled, model, args)      # every B_i = 0
    state = compiled.adapters[NAME]
    for site in state.sites:                           # the clusters partition the output rows
        rows = sorted(r for members in site.options["subspaces"] for r in members)
        assert rows == list(range(site.out_features)) and len(site.options["subspaces"]) == 3
        assert site.options["ranks"] == [min(2, len(m)) for m in site.options["subspaces"]]
    assert state.param_count == sum(_count(s) for s in state.sites)
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == state.param_count
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def _gpt2_with_biases():
    """hf_gpt2 with random biases (transformers sets them to 0, which leaves the basis' bias column 0)."""
    model, args = hf_gpt2()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(11)) * 0.5)
    return model, args


def test_conv1d_sites_merge_the_bias_column():
    # hf_gpt2: c_attn 32 -> 96 with a bias: the basis has 33 columns, the last one's update goes to the bias
    model, args, compiled = compile_kind("adamss", ["*.c_attn"], factory=_gpt2_with_biases, rank=6, num_subspaces=4)
    assert_identity_insert(compiled, model, args)
    site = compiled.adapters[NAME].sites[0]
    assert site.options["biased"] and site.params
    assert_merge(compiled, args)
    before = {n: p.detach().clone() for n, p in compiled.module.named_parameters() if n.endswith("c_attn.bias")}
    compiled.apply(["merge"])
    assert any(not torch.equal(p, before[n]) for n, p in compiled.module.named_parameters() if n in before)


@pytest.mark.parametrize("bias", [True, False])
def test_init_and_delta_match_peft(sklearn_stub, bias):
    """On the same weight: PEFT's clusters (KMeans called alike), basis, ranks and A_i bit for bit given the same
    random stream; with PEFT's random B_i the delta and bias delta are PEFT's."""
    peft = pytest.importorskip("peft")
    from peft.tuners.adamss.layer import Linear

    adamss = kinds()["adamss"]
    base = torch.nn.Linear(24, 20, bias=bias)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(seed)    # PEFT draws its A_i's randomized SVD and B_i from the global RNG
    config = peft.AdamssConfig(r=10, num_subspaces=4, subspace_rank=3, init_weights=None, random_seed=3)
    layer = Linear(copy.deepcopy(base), "default", r=10, config=config)
    opts = {"rank": 10, "num_subspaces": 4, "subspace_rank": 3, "seed": 3, "clustering": "sklearn",
            "init": "random", "dynamic_rank": False, "biased": bias}
    subspaces = subspaces_of(base.weight, base.bias, opts)
    (peft_args, peft_rows), (our_args, our_rows) = sklearn_stub.calls
    assert peft_args == our_args and (peft_rows == our_rows).all()
    assert subspaces == [layer.seg_result["default"][i].tolist() for i in range(layer.num_subspaces["default"])]
    opts.update(subspaces=subspaces, ranks=[max(1, min(len(s), 3)) for s in subspaces],
                bias_values=base.bias.tolist() if bias else None)
    fresh = adamss.init(opts, 24, 20, torch.float32, torch.Generator().manual_seed(0), base.weight.detach())
    A, B = layer.adamss_A["default"], layer.adamss_B["default"]
    assert torch.equal(fresh["adamss_basis"], layer.adamss_newB["default"])
    assert torch.equal(fresh["adamss_A"], torch.cat(list(A)).detach())
    assert torch.equal(fresh["adamss_B"], torch.cat([b.detach().flatten() for b in B]))
    assert torch.equal(fresh["adamss_rows"], layer.scatter_index["default"])
    delta = adamss.delta_weight(fresh, opts, base.weight.detach())
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(delta, layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    if bias:
        new_bias = adamss.bias_map(fresh, opts, base.bias.detach().double(), False)
        torch.testing.assert_close(new_bias - base.bias.double(), layer.get_delta_bias("default").double(),
                                   rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 24)
    with torch.no_grad():
        want = base(x) + x @ delta.T + (new_bias.float() - base.bias if bias else 0)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_peft_parity_and_export(sklearn_stub, tmp_path):
    """A randomized PEFT AdaMSS checkpoint (clusters rebuilt at import, as PEFT rebuilds them) imports with PEFT's
    outputs before and after merge; exported back, PEFT loads it with the same outputs."""
    peft = pytest.importorskip("peft")
    config = peft.AdamssConfig(target_modules=["k_proj", "up_proj"], r=12, num_subspaces=3, subspace_rank=2,
                               random_seed=1)
    compiled = peft_parity(config, tmp_path / "in")
    state = compiled.adapters[NAME]
    assert state.spec.options["clustering"] == "sklearn" and len(state.sites) == 4
    assert all(len(s.options["subspaces"]) == 3 for s in state.sites)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again")
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")


def test_import_without_scikit_learn_is_refused(sklearn_stub, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    model, args, _ = randomized_peft_checkpoint(peft.AdamssConfig(target_modules=["q_proj"], r=8, num_subspaces=2),
                                                tmp_path)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(surgeon.SurgeonError, match="needs scikit-learn"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_checkpoint_clustered_otherwise_is_refused(sklearn_stub, tmp_path):
    """PEFT's clusters are not in the file: where the import's clustering gives other subspace sizes (another
    base weight, another scikit-learn), the import is refused rather than scattering rows wrongly."""
    peft = pytest.importorskip("peft")
    model, args, _ = randomized_peft_checkpoint(peft.AdamssConfig(target_modules=["q_proj"], r=8, num_subspaces=3),
                                                tmp_path)
    sklearn_stub.fit_predict = lambda self, rows: (torch.arange(rows.shape[0]) % 3).numpy()
    with pytest.raises(surgeon.SurgeonError, match="clusters into subspaces"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_malformed_checkpoint_is_refused(sklearn_stub, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.AdamssConfig(target_modules=["q_proj"], r=8, num_subspaces=2),
                                                tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("adamss_B.1")},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="subspace 1 needs adamss_A.1"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_export_of_surgeon_clusters_is_refused(tmp_path):
    _, _, compiled = compile_kind("adamss", ["*.q_proj"], rank=8, num_subspaces=2)
    with pytest.raises(surgeon.SpecError, match="clustering: sklearn"):
        compiled.save_adapter(NAME, tmp_path, format="peft")


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("adamss", ["*.q_proj"], rank=8, num_subspaces=2, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_merge_checkpoint_of_a_peft_checkpoint_is_refused(sklearn_stub, tmp_path):
    """merge-checkpoint sees no graph to cluster the base weight in: it refuses, naming the way that works."""
    peft = pytest.importorskip("peft")
    from surgeon.merge_checkpoint import merge_checkpoint

    model, _, _ = randomized_peft_checkpoint(peft.AdamssConfig(target_modules=["q_proj"], r=8, num_subspaces=2),
                                             tmp_path / "peft")
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(surgeon.SurgeonError, match="insert it and merge there"):
        merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged")
