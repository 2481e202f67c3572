"""The mixed graph kept across a `set_active` round trip (surgeon.serving.mixed_graph): the adapters' nodes
come back under new names, the graph's shape is the same, so the mixed graph is re-tied to the adapters'
current tensors instead of rebuilt; it follows a later in-place change of a tensor (its banks' version
counters) and is rebuilt when a tensor was replaced by other memory. Each figure is checked against the
adapter's own `set_active` forward on its rows."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon import serving
from tests.conftest import hf_llama, randomize_adapters

KW = {"use_cache": False}
NAMES = ["a", "b", "__base__", "a"]


def logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def compiled():
    model, (ids,) = hf_llama()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
                         {"name": "b", "type": "lora", "targets": ["*.v_proj", "*.down_proj"], "rank": 2}]}
    compiled = surgeon.compile(model, (ids,), spec, KW, verify=False)
    randomize_adapters(compiled.module)   # both inserted: both randomized
    compiled.set_active("a")
    return compiled


def builds(monkeypatch) -> list:
    made, real = [], serving.build
    monkeypatch.setattr(serving, "build", lambda gm, ctx: made.append(gm) or real(gm, ctx))
    return made


def rows_equal_set_active(compiled, ids, got) -> None:
    for name in ("a", "b"):
        compiled.set_active(name)
        alone = logits(compiled.module(ids))
        rows = [i for i, n in enumerate(NAMES) if n == name]
        torch.testing.assert_close(got[rows], alone[rows], rtol=1e-5, atol=1e-5)
    compiled.set_active("a")


def ids_for(rows: int = len(NAMES)) -> torch.Tensor:
    return torch.randint(1, 128, (rows, 6), generator=torch.Generator().manual_seed(4))


def test_round_trip_keeps_the_mixed_graph(compiled, monkeypatch):
    ids, made = ids_for(), builds(monkeypatch)
    with torch.no_grad():
        first = logits(compiled.module(ids, adapter_names=NAMES))
        mixed = serving._CACHE[compiled.module][1]
        compiled.set_active("b")
        compiled.set_active("a")   # the same states as before; a's nodes are new, under new names
        again = logits(compiled.module(ids, adapter_names=NAMES))
    assert len(made) == 1, "the round trip should re-tie the mixed graph, not build it again"
    assert serving._CACHE[compiled.module][1] is mixed
    assert torch.equal(first, again)
    # the re-tied sites hold the module's current tensors: an in-place change reaches the mixed rows
    with torch.no_grad():
        for name, p in compiled.module.named_parameters():
            if "adapter_a" in name and name.endswith("lora_B"):
                p.mul_(3.0)
        changed = logits(compiled.module(ids, adapter_names=NAMES))
        assert not torch.allclose(changed[[0, 3]], first[[0, 3]], atol=1e-4)
        torch.testing.assert_close(changed[1], first[1], rtol=1e-6, atol=1e-6)
        rows_equal_set_active(compiled, ids, changed)
    assert len(made) == 1


def test_other_memory_rebuilds(compiled, monkeypatch):
    ids, made = ids_for(), builds(monkeypatch)
    with torch.no_grad():
        first = logits(compiled.module(ids, adapter_names=NAMES))
        compiled.set_active("b")
        compiled.set_active("a")
        site = compiled.ctx.adapters["b"].sites[0]   # b is parked: swap one of its tensors for new memory
        site.parked["lora_B"] = site.parked["lora_B"] * 3.0
        got = logits(compiled.module(ids, adapter_names=NAMES))
    assert len(made) == 2, "a tensor in other memory cannot be re-tied: the mixed graph is built again"
    assert not torch.allclose(got[1], first[1], atol=1e-4)
    with torch.no_grad():
        rows_equal_set_active(compiled, ids, got)


def test_changed_states_rebuild(compiled, monkeypatch):
    ids, made = ids_for(), builds(monkeypatch)
    with torch.no_grad():
        compiled.module(ids, adapter_names=NAMES)
        compiled.set_active("b")   # other states: another key, another shape
        got = logits(compiled.module(ids, adapter_names=NAMES))
        assert len(made) == 2
        compiled.set_active("a")
        rows_equal_set_active(compiled, ids, got)


def test_shape_ignores_names_only():
    import torch.fx as fx

    def graph(name: str, scale: float) -> fx.GraphModule:
        g = fx.Graph()
        x = g.placeholder("x")
        y = g.call_function(torch.mul, (x, scale))
        y.name = name
        g.output(g.call_function(torch.add, (y, x)))
        return fx.GraphModule(torch.nn.Module(), g)

    assert serving._shape(graph("m", 2.0)) == serving._shape(graph("renamed", 2.0))
    assert serving._shape(graph("m", 2.0)) != serving._shape(graph("m", 3.0))


def test_gather_thresholds(monkeypatch):
    """The gathered path for a small batch, long rows (a prefill) or few rows per adapter; the loop for many
    short rows of few adapters. Both give the same rows."""
    from surgeon.adapters.lora import LORA

    K, N, gen = 6, 5, torch.Generator().manual_seed(0)
    routes = [(n, LORA, {"rank": 2, "alpha": 2}, (K, N),
               {"lora_A": torch.randn(2, K, generator=gen), "lora_B": torch.randn(N, 2, generator=gen)})
              for n in "abcdef"]
    site = serving.MixedSite("output", routes)
    calls, real = [], serving.MixedSite._gathered
    monkeypatch.setattr(serving.MixedSite, "_gathered", lambda self, *a: calls.append(a[0].batch) or real(self, *a))

    def run(rows: int, tokens: int, adapters=("a", "b")):
        names = [adapters[r % len(adapters)] for r in range(rows)]
        plan = serving.RowPlan(rows, {n: torch.tensor([i for i, m in enumerate(names) if m == n])
                                      for n in set(names)}, None)
        x, y = torch.randn(rows, tokens, K, generator=gen), torch.randn(rows, tokens, N, generator=gen)
        got = site(plan, x, y.clone())
        with monkeypatch.context() as m:
            m.setattr(serving.MixedSite, "_gathers", lambda *a: None)
            torch.testing.assert_close(got, site(plan, x, y), rtol=1e-5, atol=1e-5)
        return bool(calls) and calls.pop() == rows

    with torch.no_grad():
        assert run(80, serving.GATHER_MIN_TOKENS)                        # long rows: gathered
        assert not run(80, 1)                                             # 40 short rows per adapter: the loop
        assert not run(80, serving.GATHER_MIN_TOKENS - 1)
        assert run(serving.GATHER_MAX_ROWS, 1)                            # a small batch
        assert not run(serving.GATHER_MAX_ROWS + 2, 1)                    # 9 rows per adapter, 7 slots: the loop
        assert run(6 * serving.GATHER_ROWS_PER_ADAPTER, 1, "abcdef")      # at most 4 rows per adapter
        assert not run(6 * serving.GATHER_ROWS_PER_ADAPTER + 2, 1, "abcdef")


def test_a_new_base_tensor_rebuilds(compiled, monkeypatch):
    ids, made = ids_for(), builds(monkeypatch)
    with torch.no_grad():
        compiled.module(ids, adapter_names=NAMES)
        compiled.set_active("b")
        compiled.set_active("a")
        q = compiled.module.get_submodule("model.layers.0.self_attn.q_proj")   # a base weight put in anew
        q.weight = torch.nn.Parameter(q.weight.detach() * 2.0, requires_grad=False)
        got = logits(compiled.module(ids, adapter_names=NAMES))
    assert len(made) == 2, "the mixed graph read the old weight: it is built again"
    with torch.no_grad():
        rows_equal_set_active(compiled, ids, got)
