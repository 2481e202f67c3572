"""merge: W + s B A folded into the base weight; the graph is the base graph again."""
from __future__ import annotations

import pytest
import torch

import surgeon
from tests.conftest import hf_gpt2, hf_llama, lora_spec, peft_lora_checkpoint, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits, op_counts

KW = {"use_cache": False}


@pytest.mark.parametrize("factory,targets", [(hf_llama, ["*_proj"]), (hf_gpt2, ["*.c_attn", "*.c_fc", "*.c_proj"])])
def test_merge_restores_base_ops_and_keeps_outputs(factory, targets):
    model, args = factory()
    base = surgeon.compile(model, args, {"adapters": []}, KW).module
    compiled = surgeon.compile(model, args, lora_spec(targets, rank=4), KW)
    randomize_adapters(compiled.module)
    unmerged = logits(compiled.module, args)
    assert not torch.allclose(unmerged, logits(model, args))       # the adapter does something
    compiled.apply(["merge"])
    assert op_counts(compiled.module) == op_counts(base)
    assert adapter_nodes(compiled.module) == []
    assert not any("adapter_" in n for n, _ in compiled.module.named_parameters())
    merged = logits(compiled.module, args)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    row = compiled.report.rows[-1]
    assert row.name == "merge" and row.matches == len(compiled.adapters["chat"].sites)


def test_merge_writes_new_tensors_in_each_layout():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.c_fc"], rank=2, alpha=4), KW)
    randomize_adapters(compiled.module)
    site = compiled.adapters["chat"].sites[0]
    A = compiled.module.get_parameter(site.params["lora_A"]).detach().clone()
    B = compiled.module.get_parameter(site.params["lora_B"]).detach().clone()
    W = model.get_parameter(f"{site.path}.weight").detach().clone()     # Conv1D: (in, out)
    compiled.apply(["merge"])
    merged = compiled.module.get_parameter(site.weight)
    torch.testing.assert_close(merged, W + 2.0 * (B @ A).T)
    assert torch.equal(model.get_parameter(f"{site.path}.weight"), W)     # user's weight untouched


def test_merge_one_of_two_adapters():
    model, args = hf_llama()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 2},
                         {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 2}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply([{"merge": {"adapters": ["a"]}}])
    assert adapter_nodes(compiled.module, "a") == [] and adapter_nodes(compiled.module, "b")
    torch.testing.assert_close(logits(compiled.module, args), before, rtol=1e-5, atol=1e-5)


def test_merge_into_a_tied_weight_unties_only_that_use():
    model, args = hf_gpt2()     # lm_head.weight is wte.weight
    compiled = surgeon.compile(model, args, lora_spec(["lm_head"], rank=2), KW)
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    torch.testing.assert_close(logits(compiled.module, args), before, rtol=1e-5, atol=1e-5)
    embedding = compiled.module.get_parameter("transformer.wte.weight")
    assert torch.equal(embedding, model.transformer.wte.weight)


def test_a_module_called_from_several_places_shares_one_adapter_through_merge_unmerge_remove(tmp_path):
    """ALBERT runs one layer's modules at every depth. Before: merge failed with "Argument 'linear_7' of
    Node 'view' was used before it has been defined" (each call's users were rewired to another call's
    base output), and the failed merge left unmerge/remove raising AttributeError."""
    import peft
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32)
    model = AlbertModel(cfg).eval()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    wrapped = peft_lora_checkpoint(model, peft.LoraConfig(r=2, target_modules=["query", "ffn"]), tmp_path)
    compiled = surgeon.compile(model, (ids,), {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]})
    assert compiled.report.rows[-1].matches == 2 * 3          # two modules, each called at three depths
    with torch.no_grad():
        want = wrapped(ids).last_hidden_state
        torch.testing.assert_close(compiled.module(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        for step in ("merge", "unmerge"):
            compiled.apply([step])
            torch.testing.assert_close(compiled.module(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        compiled.apply(["remove"])       # after merge + unmerge the base is W + d - d, rounded once in fp32
        torch.testing.assert_close(compiled.module(ids).last_hidden_state, model(ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        fresh = surgeon.compile(model, (ids,), {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]})
        fresh.apply(["remove"])          # straight after insert: the base exactly
        torch.testing.assert_close(fresh.module(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)


def _float64_sum(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (weight.double() + delta.double()).to(weight.dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN for NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a[~a.isnan()], b[~b.isnan()])


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merged_weight_is_the_float64_rule_bit_for_bit(weight_dtype, delta_dtype):
    """merged_weight (what the merge pass and merge_checkpoint write: one add, no float64 copy) equals the
    rule before it, (W.double() + dW.double()).to(W.dtype), bit for bit: in every layout, on sums within
    a fraction of a float32 step of a tie of W's dtype, and on non-finite values."""
    from surgeon.adapters import merged_weight

    gen = torch.Generator().manual_seed(0)
    cases = []
    for shape in [(600, 1000), (1, 700000), (37, 53), (5, 4, 3), (), (0, 5)]:   # pieces; one add (small)
        weight = (torch.randn(shape, generator=gen) * 3).to(weight_dtype)
        cases.append((weight, (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-2).to(delta_dtype)))
    weight, delta = cases[0]
    cases += [(weight.t(), delta.t()), (weight.t().contiguous(), delta.t()), (weight.t(), delta.t().contiguous())]
    if weight_dtype in (torch.bfloat16, torch.float16) and delta_dtype == torch.float32:
        up = torch.nextafter(weight, torch.full_like(weight, float("inf")))
        half = (up.float() - weight.float()) / 2                 # W + half is a tie of W's dtype ...
        step = torch.nextafter(weight.float(), torch.full_like(weight.float(), float("inf"))) - weight.float()
        ties = half + torch.randint(-1, 2, weight.shape, generator=gen) * step / 4   # ... give or take less than
        cases.append((weight, ties))                             # a float32 step of the sum
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38, 65504, 65519, 1e-8])
    for value in [0.0, 1.0, -1e-45, 3e38, float("inf"), 16.0, 1e-3]:
        cases.append((specials.to(weight_dtype), torch.full((10,), value, dtype=torch.float64).to(delta_dtype)))
    for weight, delta in cases:
        want = _float64_sum(weight, delta)
        got = merged_weight(weight, delta)
        assert got.is_contiguous() and _same(got, want), (list(weight.shape), weight.stride(), delta.stride())
    with pytest.raises(ValueError, match="cannot merge into a weight of shape"):
        merged_weight(torch.zeros(3, 4, dtype=weight_dtype), torch.zeros(4, 3, dtype=delta_dtype))


def test_every_kind_builds_its_delta_in_the_merge_dtype():
    """The delta contract (AdapterKind.delta_weight / undo_delta): float32 for a bf16, fp16 or fp32 weight,
    float64 for a float64 one, whatever the parameters' dtype, so a merge never widens a whole weight
    to float64."""
    from surgeon.adapters import kinds, merge_dtype

    size, gen = 256, torch.Generator().manual_seed(0)   # a site every kind's defaults fit (OFT, MiSS, C3A blocks)
    # kinds whose merge writes trained values over the base's (a norm's copy, embedding rows) build new - W in
    # float64 so that W + (new - W) rounds back to `new` bit for bit: the delta is the parameter's size
    # (trainable_tokens: vocab x hidden; see docs/limits.md); their own tests check the bits
    writes_values = {"ln_tuning", "trainable_tokens"}
    checked = []
    for name, kind in kinds().items():
        if name in writes_values:
            continue
        opts = {key: option.default for key, option in kind.options.items()}
        opts.update({"s2ft": {"columns": 8}, "parallel-adapter": {"activation": "none"}}.get(name, {}))
        if kind.refusal(opts):
            continue
        weight = torch.randn(size, size, generator=gen) * 0.1
        params = kind.init(opts, size, size, torch.float32, torch.Generator().manual_seed(0), weight)
        params = {p: t + 0.01 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
                  for p, t in params.items()}
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            typed = {p: t.to(dtype) if t.is_floating_point() else t for p, t in params.items()}
            delta = kind.delta_weight(typed, opts, weight.to(dtype))
            assert delta.dtype == merge_dtype(weight.to(dtype)), (name, dtype, delta.dtype)
            if kind.undo_delta is not None and not kind.refuse_unmerge:
                undo = kind.undo_delta(typed, opts, weight.to(dtype))
                assert undo.dtype == merge_dtype(weight.to(dtype)), (name, "undo", dtype, undo.dtype)
        checked.append(name)
    assert {"lora", "dora", "oft", "ia3", "s2ft", "miss", "hydra"} <= set(checked), checked
