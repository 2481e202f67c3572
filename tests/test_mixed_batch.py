"""Mixed batches: one adapter per row (`adapter_names=[...]`, PEFT's convention) in the compiled module's
forward and in generate, against PEFT's own mixed-batch inference on the same adapters (tiny LLaMA with
grouped-query heads and GPT-2; BERT's forward, with a padded batch), two adapters with different targets,
ranks and scales (one rsLoRA); the stacked (gathered) path against the per-adapter loop, site by site;
`__base__` rows equal to the base model; a batch of one adapter equal to `set_active` of it; the other
kinds that join (LoRA-XS, VeRA, IA3 on output and input) row by row against `set_active`; the refusals.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError
from surgeon import serving
from tests.conftest import hf_bert, hf_gpt2, hf_llama, peft_lora_checkpoint, randomize_adapters

peft = pytest.importorskip("peft")
KW = {"use_cache": False}
NEW = 6
CASES = {   # two adapters each: different module sets (one shared), ranks, alphas, and rsLoRA on one
    "llama": (hf_llama, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
              dict(target_modules=["v_proj", "o_proj", "down_proj"], r=8, lora_alpha=4, use_rslora=True)),
    "gpt2": (hf_gpt2, dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
             dict(target_modules=["c_attn", "c_fc"], r=2, lora_alpha=6, use_rslora=True, fan_in_fan_out=True)),
}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def setup(case, tmp_path):
    """The base model, its example, PEFT with adapters a and b loaded, and surgeon's compile of both."""
    factory, a, b = CASES[case]
    model, args = factory()
    for name, options, seed in (("a", a, 7), ("b", b, 11)):
        config = peft.LoraConfig(lora_dropout=0.0, **options)
        peft_lora_checkpoint(model, config, tmp_path / name, scale=0.3, seed=seed)
    both = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a", adapter_name="a").eval()
    both.load_adapter(tmp_path / "b", adapter_name="b")
    spec = {"adapters": [{"name": n, "from_peft": str(tmp_path / n)} for n in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, KW, verify=False)
    return model, both, compiled


def spy_gathered(monkeypatch) -> list:
    """The MixedSites that run the gathered path from now on, one entry per call."""
    calls, real = [], serving.MixedSite._gathered
    monkeypatch.setattr(serving.MixedSite, "_gathered", lambda self, *a: calls.append(self) or real(self, *a))
    return calls


def batch(vocab: int, rows: int = 5, length: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def prompts(vocab: int, lengths=(3, 6, 4, 5, 2), seed: int = 5):
    """A left-padded batch of prompts (pad id 0) and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(1, vocab, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_peft_mixed_batch(case, tmp_path, monkeypatch):
    model, both, compiled = setup(case, tmp_path)
    ids = batch(model.config.vocab_size)
    names = ["a", "__base__", "b", "a", "b"]
    code = compiled.module.code
    gathered = spy_gathered(monkeypatch)
    with torch.no_grad():
        expected = both(ids, adapter_names=names).logits
        got = logits(compiled.module(ids, adapter_names=names))
        base = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert gathered, "a batch of several adapters runs the stacked banks"
    assert not torch.allclose(expected[0], base[0], atol=1e-3) and not torch.allclose(expected[2], base[2], atol=1e-3)
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)   # the __base__ row: the base model
    assert compiled.module.code == code   # the user's graph is left as it was
    with torch.no_grad():   # without adapter_names (or None): the plain call, both adapters active as before
        assert torch.equal(logits(compiled.module(ids, adapter_names=None)), logits(compiled.module(ids)))


def test_bert_forward_matches_peft_mixed_batch(tmp_path, monkeypatch):
    """BERT (an encoder: its forward, no generate), a right-padded batch; adapter a on query/value (r 4), b on
    value and every dense layer (attention output, intermediate, output; r 8, rsLoRA, another alpha)."""
    model, args, kwargs = hf_bert()
    for name, options, seed in (("a", dict(target_modules=["query", "value"], r=4, lora_alpha=8), 7),
                                ("b", dict(target_modules=["value", "dense"], r=8, lora_alpha=12, use_rslora=True),
                                 11)):
        peft_lora_checkpoint(model, peft.LoraConfig(lora_dropout=0.0, **options), tmp_path / name, scale=0.3,
                             seed=seed)
    both = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a", adapter_name="a").eval()
    both.load_adapter(tmp_path / "b", adapter_name="b")
    spec = {"adapters": [{"name": n, "from_peft": str(tmp_path / n)} for n in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, kwargs, verify=False)
    ids = batch(model.config.vocab_size, rows=5, length=8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    names = ["b", "a", "__base__", "a", "b"]
    gathered = spy_gathered(monkeypatch)
    with torch.no_grad():
        expected = both(input_ids=ids, attention_mask=mask, adapter_names=names).last_hidden_state
        got = compiled.module(ids, attention_mask=mask, adapter_names=names)
        got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
        base = model(ids, attention_mask=mask).last_hidden_state
    assert gathered, "a batch of several adapters runs the stacked banks"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], base[2], rtol=1e-5, atol=1e-5)
    for row in (0, 1, 3, 4):
        assert not torch.allclose(expected[row], base[row], atol=1e-3)
    with torch.no_grad():   # every row one adapter: set_active's graph, bit for bit
        whole = compiled.module(ids, attention_mask=mask, adapter_names=["b"] * 5)
        compiled.set_active("b")
        alone = compiled.module(ids, attention_mask=mask)
    assert torch.equal(whole[0], alone[0])


@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_matches_peft_mixed_batch(case, tmp_path):
    model, both, compiled = setup(case, tmp_path)
    ids, mask = prompts(model.config.vocab_size)
    names = ["b", "a", "__base__", "b", "a"]
    with torch.no_grad():
        expected = both.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0, adapter_names=names)
        base = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, adapter_names=names)
    assert compiled.generator.mode == "cache", compiled.generator.notes
    assert torch.equal(got, expected)
    assert torch.equal(got[2], base[2])
    assert not torch.equal(expected[[0, 1, 3, 4]], base[[0, 1, 3, 4]]), "the adapters should change the tokens"


def test_every_row_one_adapter_equals_set_active(tmp_path):
    model, both, compiled = setup("llama", tmp_path)
    ids = batch(model.config.vocab_size, rows=3)
    with torch.no_grad():
        mixed_b = logits(compiled.module(ids, adapter_names=["b"] * 3))
        base = logits(compiled.module(ids, adapter_names=["__base__"] * 3))
        compiled.set_active("b")
        assert torch.equal(mixed_b, logits(compiled.module(ids)))
        compiled.set_active()
        assert torch.equal(base, logits(compiled.module(ids)))
        torch.testing.assert_close(base, model(ids).logits, rtol=1e-5, atol=1e-5)
        # the mixed graph follows the adapters' states: with b parked it still serves b's rows
        again = logits(compiled.module(ids, adapter_names=["b", "__base__", "a"]))
    compiled.set_active("a", "b")
    with torch.no_grad():
        expected = both(ids, adapter_names=["b", "__base__", "a"]).logits
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_other_kinds_join_row_by_row(monkeypatch):
    """LoRA-XS, VeRA, IA3 (output and input scale) and LoRA in one batch: each row equals its adapter alone."""
    model, (ids,) = hf_llama()
    spec = {"adapters": [{"name": "xs", "type": "lora-xs", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
                         {"name": "vera", "type": "vera", "targets": ["*.q_proj", "*.up_proj"], "rank": 8},
                         {"name": "scale", "type": "ia3", "targets": ["*.k_proj", "*.v_proj"]},
                         {"name": "ff", "type": "ia3", "targets": ["*.down_proj"], "on": "input"},
                         {"name": "lora", "type": "lora", "targets": ["*.v_proj"], "rank": 2, "alpha": 4}]}
    compiled = surgeon.compile(model, (ids,), spec, KW, verify=False)
    randomize_adapters(compiled.module)
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad and p.dim() == 1:   # IA3 and VeRA scales around 1, not 0
                p.add_(1.0)
    names = ["ff", "xs", "__base__", "vera", "scale", "lora", "xs"]
    x = batch(128, rows=len(names), length=5)
    gathered = spy_gathered(monkeypatch)
    with torch.no_grad():
        got = logits(compiled.module(x, adapter_names=names))
        assert {site.side for site in gathered} == {"input", "output"}
        for name in ("xs", "vera", "scale", "ff", "lora"):
            compiled.set_active(name)
            alone = logits(compiled.module(x))
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(got[rows], alone[rows], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(alone[rows], model(x).logits[rows], atol=1e-3)
        torch.testing.assert_close(got[2], model(x).logits[2], rtol=1e-5, atol=1e-5)


def _two_lora(extra: dict | None = None, pipeline=None):
    model, (ids,) = hf_llama()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 4},
                         {"name": "b", "type": "lora", "targets": ["*.v_proj"], "rank": 2},
                         *([extra] if extra else [])]}
    if pipeline:
        spec["pipeline"] = pipeline
    return surgeon.compile(model, (ids,), spec, KW, verify=False), ids


def test_refuses_unknown_names_and_wrong_length():
    compiled, ids = _two_lora()
    with pytest.raises(SurgeonError, match=r"no adapter named 'c'.*'__base__', 'a', 'b'"):
        compiled.module(ids, adapter_names=["a", "c"])
    with pytest.raises(SurgeonError, match="3 names but the batch has 2 rows"):
        compiled.module(ids, adapter_names=["a", "b", "a"])
    with pytest.raises(SurgeonError, match="one per row"):
        compiled.module(ids, adapter_names="a")
    with pytest.raises(SurgeonError, match="1 names but the batch has 2 rows"):
        compiled.generate(ids, max_new_tokens=2, adapter_names=["a"])


def test_refuses_kinds_and_states_that_cannot_join():
    compiled, ids = _two_lora({"name": "d", "type": "dora", "targets": ["*.k_proj"], "rank": 2})
    with pytest.raises(SurgeonError, match=r"adapter 'd' \(dora, inserted\) cannot join a mixed batch: a 'dora' "
                                           r"adapter is not a per-row"):
        compiled.module(ids, adapter_names=["a", "d"])
    with torch.no_grad():   # a kind that cannot join may sit in the model: rows not naming it never see it
        compiled.module(ids, adapter_names=["a", "b"])
    compiled.module.train()
    with pytest.raises(SurgeonError, match="eval mode only"):
        compiled.module(ids, adapter_names=["a", "b"])
    compiled.module.eval()
    compiled.apply([{"merge": {"adapters": ["b"]}}])
    with pytest.raises(SurgeonError, match=r"adapter 'b' \(lora, merged\).*merged into the base weights.*"
                                           r"'__base__' rows"):
        compiled.module(ids, adapter_names=["a", "__base__"])
    with pytest.raises(SurgeonError, match=r"adapter 'b' \(lora, merged\) cannot join"):
        compiled.generate(ids, max_new_tokens=2, adapter_names=["a", "b"])


def test_refuses_a_base_rewriting_init():
    compiled, ids = _two_lora({"name": "p", "type": "lora", "targets": ["*.k_proj"], "rank": 2, "init": "pissa"})
    with pytest.raises(SurgeonError, match=r"adapter 'p'.*pissa init rewrote the base weight"):
        compiled.module(ids, adapter_names=["a", "b"])


def _site_routes(K: int, N: int, dtype: torch.dtype, seed: int = 8):
    """Routes of one output site: LoRA (two ranks, rsLoRA on one), LoRA-XS, VeRA (projections wider than
    the site, sliced), IA3, a LoRA with a bias on B (it does not stack: the loop runs it) and one unused."""
    from surgeon.adapters.ia3 import IA3
    from surgeon.adapters.lora import LORA
    from surgeon.adapters.lora_xs import LORA_XS
    from surgeon.adapters.vera import VERA

    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    lora = lambda r, alpha, rs=False: (LORA, {"rank": r, "alpha": alpha, "use_rslora": rs},  # noqa: E731
                                       {"lora_A": rnd(r, K), "lora_B": rnd(N, r)})
    kinds = {"a": lora(2, 4), "b": lora(6, 3, True), "unused": lora(1, 1),
             "xs": (LORA_XS, {"rank": 3, "alpha": 5}, {"lora_A": rnd(3, K), "lora_R": rnd(3, 3), "lora_B": rnd(N, 3)}),
             "v": (VERA, {"rank": 5}, {"vera_A": rnd(5, K + 4), "vera_B": rnd(N + 3, 5), "vera_lambda_d": rnd(5),
                                       "vera_lambda_b": rnd(N)}),
             "s": (IA3, {"on": "output"}, {"ia3_l": 1 + rnd(N)}),
             "bias": (LORA, {"rank": 2, "alpha": 2}, {"lora_A": rnd(2, K), "lora_B": rnd(N, 2), "lora_bias": rnd(N)})}
    return [(name, kind, opts, (K, N), params) for name, (kind, opts, params) in kinds.items()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gathered_site_equals_the_loop(dtype, monkeypatch):
    """One MixedSite: the stacked banks' path against the per-adapter loop (each kind's own forward on its
    rows), with the batch dim kept and flattened (GPT-2's Conv1D); __base__ rows and the IA3 rows bit for
    bit; the bank built once and rebuilt after an in-place update; the loop where gradients are recorded
    and for a large batch with few adapters."""
    from surgeon.serving import MixedSite

    K, N = 12, 10
    routes = _site_routes(K, N, dtype)
    site = MixedSite("output", routes)
    assert site._names == ("a", "b", "unused", "xs", "v", "s") and [r[0] for r in site._looped] == ["bias"]
    names = ["a", "__base__", "xs", "v", "s", "bias", "b", "a"]
    plan = serving.RowPlan(len(names), {n: torch.tensor([i for i, m in enumerate(names) if m == n])
                                        for n in set(names) - {"__base__"}}, None)   # names from the groups
    assert plan.names == tuple(names)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(names), 3, K, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(len(names), 3, N, generator=gen, dtype=torch.float64).to(dtype)
    calls = spy_gathered(monkeypatch)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)

    def loop(plan, x, y):
        with monkeypatch.context() as m:
            m.setattr(MixedSite, "_gathers", lambda *a: None)
            return site(plan, x, y)

    for x_in, y_in in ((x, y), (x.reshape(-1, K), y.reshape(-1, N))):
        y_copy = y_in.clone()
        got = site(plan, x_in, y_copy)          # the output site updates y in place: a copy here
        want = loop(plan, x_in, y_in)
        assert torch.equal(y_in.reshape(y.shape), y)   # the loop leaves y as it is
        torch.testing.assert_close(got, want, **tolerance)
        got3, want3 = got.view(y.shape), want.view(y.shape)
        assert torch.equal(got3[1], y[1]) and torch.equal(got3[4], want3[4])   # __base__, IA3
        for row in (0, 2, 3, 5, 6):
            assert not torch.allclose(got3[row], y[row], atol=1e-3)
    assert len(calls) == 2
    bank = site._site_bank[1]
    assert bank.a.shape == (7, K, 6) and bank.b.shape == (7, 6, N) and bank.scale.shape == (7, N)
    assert not bank.a[0].any() and not bank.b[0].any() and torch.equal(bank.scale[0], torch.ones(N, dtype=dtype))
    assert site not in plan.gathered                                   # 8 rows gathered > 7 slots: not kept
    steps = serving.RowPlan(6, {n: torch.tensor([i for i, m in enumerate(names[:6]) if m == n])
                                for n in set(names[:6]) - {"__base__"}}, None)
    first = site(steps, x[:6], y[:6].clone())
    held = steps.gathered[site][1]
    torch.testing.assert_close(site(steps, x[:6], y[:6].clone()), first, rtol=0, atol=0)
    assert site._site_bank[1] is bank                                  # kept while no tensor changes
    assert steps.gathered[site][1] is held                             # the plan's gather reused (decode steps)
    with torch.no_grad():
        routes[0][4]["lora_B"].mul_(3.0)                               # a's B, updated in place: rebuilt
    got = site(plan, x, y.clone())
    assert site._site_bank[1] is not bank
    torch.testing.assert_close(got, loop(plan, x, y), **tolerance)
    stale = site(steps, x[:6], y[:6].clone())     # the same plan (one generate, whose adapters cannot change): kept
    assert steps.gathered[site][1] is held and torch.equal(stale, first)
    fresh = serving.RowPlan(6, steps.groups, None)                     # the next call's plan: gathered again
    again = site(fresh, x[:6], y[:6].clone())
    assert fresh.gathered[site][1] is not held
    torch.testing.assert_close(again, loop(fresh, x[:6], y[:6]), **tolerance)
    before = len(calls)
    routes[1][4]["lora_A"].requires_grad_(True)                        # gradients recorded: the loop
    out = site(plan, x, y)
    out.sum().backward()
    assert len(calls) == before and routes[1][4]["lora_A"].grad is not None
    routes[1][4]["lora_A"].requires_grad_(False)
    big = serving.RowPlan(80, {n: torch.arange(i, 80, 2) for i, n in enumerate(("a", "b"))}, None)
    site(big, torch.randn(80, 1, K, dtype=dtype), torch.randn(80, 1, N, dtype=dtype))
    assert len(calls) == before


def test_gathered_input_scale_site(monkeypatch):
    """IA3 on a site's input: x * l per row, the __base__ rows untouched, bit-equal to the loop."""
    from surgeon.adapters.ia3 import IA3
    from surgeon.serving import MixedSite

    K = 6
    gen = torch.Generator().manual_seed(3)
    routes = [(n, IA3, {"on": "input"}, (K, 4), {"ia3_l": 1 + torch.randn(K, generator=gen)}) for n in ("p", "q")]
    site = MixedSite("input", routes)
    names = ["q", "__base__", "p", "q"]
    plan = serving.RowPlan(4, {"p": torch.tensor([2]), "q": torch.tensor([0, 3])}, None, names)
    x = torch.randn(4, 5, K, generator=gen)
    calls = spy_gathered(monkeypatch)
    got = site(plan, x)
    monkeypatch.setattr(MixedSite, "_gathers", lambda *a: None)
    assert len(calls) == 1 and torch.equal(got, site(plan, x)) and torch.equal(got[1], x[1])
    assert torch.equal(got[2], x[2] * routes[0][4]["ia3_l"])
