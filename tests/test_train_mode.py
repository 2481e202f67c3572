"""Train mode: a compiled module follows .train() / .eval() as its model does (surgeon/modes.py).

Dropout drops and BatchNorm uses batch statistics (and updates its running ones) in train mode,
both off again in eval; a folded BN stays folded; attention dropout is read back from Hugging Face
attention modules. LoRA-family kinds take PEFT's adapter dropout, imported from and exported to
PEFT configs, and training through surgeon matches training through PEFT.
"""
from __future__ import annotations

import copy
import json
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from tests.adapters.helpers import randomized_peft_checkpoint
from tests.conftest import assert_untouched, hf_llama, lora_spec, randomize_adapters, small_cnn, snapshot

peft = pytest.importorskip("peft")
KW = {"use_cache": False}
EMPTY = {"pipeline": []}


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).eval()


def _ops(gm, name: str) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


# ---------------------------------------------------------------- the model's own dropout and BatchNorm

def test_dropout_is_on_in_train_mode_and_off_in_eval():
    model, x = _dropout_model(), torch.randn(6, 8)
    before = snapshot(model)
    module = surgeon.compile(model, (x,), EMPTY).module
    assert not module.training, "the compiled module starts in eval mode, as captured"
    with torch.no_grad():
        assert torch.equal(module(x), model(x))
        module.train()
        first, second = module(x), module(x)
        assert not torch.equal(first, second), "dropout is on in train mode"
        eager = copy.deepcopy(model).train()
        torch.manual_seed(3)
        want = eager(x)
        torch.manual_seed(3)
        assert torch.equal(module(x), want), "the same ops draw the same masks as the eager model"
        module.eval()
        assert torch.equal(module(x), model(x)), "and off again in eval"
    assert_untouched(model, before)


@pytest.mark.parametrize("momentum", [0.1, None])   # None: a cumulative average over num_batches_tracked
def test_batch_norm_trains_on_batch_statistics_and_updates_running_ones(momentum):
    model, (x,) = small_cnn()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = momentum
    before = snapshot(model)
    module = surgeon.compile(model, (x,), EMPTY).module
    eager = copy.deepcopy(model).train()
    module.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = torch.randn(4, 3, 8, 8, generator=gen)
        got, want = module(batch), eager(batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, buffer in eager.named_buffers():
        if "running" in name or (momentum is None and "num_batches" in name):
            torch.testing.assert_close(module.get_buffer(name), buffer, rtol=1e-5, atol=1e-6, msg=name)
    running = dict(module.named_buffers())["stem.1.running_mean"]
    assert not torch.equal(running, model.stem[1].running_mean), "the running statistics moved"
    module.eval()
    torch.testing.assert_close(module(x), eager.eval()(x), rtol=1e-5, atol=1e-5)
    assert_untouched(model, before)


def test_a_folded_batch_norm_stays_folded_in_train_mode():
    model, (x,) = small_cnn()
    compiled = surgeon.compile(model, (x,), {"pipeline": ["fold-bn"]})
    assert compiled.report.rows[-1].matches == 4 and not _ops(compiled.module, "batch_norm")
    module = compiled.module
    with torch.no_grad():
        evaluated = module(x)
        module.train()
        torch.testing.assert_close(module(x), evaluated, rtol=0, atol=0)   # the eval affine map, no batch stats
        torch.testing.assert_close(evaluated, model(x), rtol=1e-5, atol=1e-5)


def test_fold_bn_and_passes_check_in_eval_whatever_the_mode():
    model, (x,) = small_cnn()
    compiled = surgeon.compile(model, (x,), EMPTY)
    compiled.module.train()
    compiled.apply(["fold-bn"])                 # checks against the graph before it, in eval
    assert compiled.module.training, "the user's mode is kept"
    assert compiled.report.rows[-1].matches == 4
    stem = dict(compiled.module.named_buffers()).get("stem.1.running_mean")
    assert stem is None, "folded: its statistics are gone"


def test_attention_dropout_is_read_back_from_the_attention_modules():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.25)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = surgeon.compile(model, (ids,), EMPTY, KW)
    module = compiled.module
    info = module.meta["surgeon_train_mode"]
    assert info["attention"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with torch.no_grad():
        assert torch.equal(module(ids).logits, model(ids, **KW).logits)
        module.train()
        eager = copy.deepcopy(model).train()
        torch.manual_seed(5)
        want = eager(ids, **KW).logits
        torch.manual_seed(5)
        got = module(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(ids, **KW).logits, atol=1e-3), "attention dropout acted"


# ---------------------------------------------------------------- adapter dropout

def _lora_on_linear(p: float, kind: str = "lora"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12)).eval()
    x = torch.randn(5, 16)
    spec = {"adapters": [{"name": "a", "type": kind, "targets": ["0"], "rank": 4, "alpha": 8, "dropout": p}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, (x,), spec)
    randomize_adapters(compiled.module)
    return model, x, compiled


def test_lora_dropout_drops_the_branch_input_in_train_mode_only():
    model, x, compiled = _lora_on_linear(0.5)
    module, site = compiled.module, compiled.adapters["a"].sites[0]
    A, B = (module.get_parameter(site.params[p]).detach() for p in ("lora_A", "lora_B"))
    drops = _ops(module, "dropout")
    assert len(drops) == 1 and drops[0].meta["surgeon_adapter"] == "a"
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(module(x), y + 2.0 * x @ A.T @ B.T)     # eval: no dropout
        module.train()
        torch.manual_seed(0)
        want = y + 2.0 * F.dropout(x, 0.5, training=True) @ A.T @ B.T      # PEFT: B(A(dropout(x))) * s
        torch.manual_seed(0)
        torch.testing.assert_close(module(x), want)
        assert not torch.allclose(module(x), module(x))
        module.eval()
        unmerged = module(x)
    compiled.apply(["merge"])                                              # merge stays exact: eval semantics
    torch.testing.assert_close(compiled.module(x), unmerged, rtol=1e-5, atol=1e-6)
    assert not _ops(compiled.module, "dropout")


def test_no_dropout_adds_no_node():
    _, _, compiled = _lora_on_linear(0.0)
    assert not _ops(compiled.module, "dropout")
    assert not any(n.op == "get_attr" and "_surgeon_mode" in n.target for n in compiled.module.graph.nodes)


def test_passes_check_an_adapter_with_dropout_in_eval_even_in_train_mode():
    _, x, compiled = _lora_on_linear(0.5)
    compiled.module.train()
    compiled.apply(["merge"])      # the check before/after would see two different masks in train mode
    assert compiled.module.training


@pytest.mark.parametrize("kind", ["vera", "lora-xs"])
def test_other_kinds_drop_their_branch_input(kind):
    _, x, compiled = _lora_on_linear(0.5, kind) if kind != "vera" else _vera(0.5)
    module = compiled.module
    assert len(_ops(module, "dropout")) == 1
    with torch.no_grad():
        evaluated = module(x)
        module.train()
        assert not torch.allclose(module(x), evaluated)
        module.eval()
        assert torch.equal(module(x), evaluated)


def _vera(p):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 12)).eval(), torch.randn(5, 16)
    spec = {"adapters": [{"name": "a", "type": "vera", "targets": ["0"], "rank": 4, "dropout": p}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, (x,), spec)
    randomize_adapters(compiled.module)
    return model, x, compiled


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_dropout_outside_zero_one_is_refused(value):
    with pytest.raises(surgeon.SpecError, match=r"dropout.*must be in \[0, 1\]"):
        surgeon.load_spec(lora_spec(["*.q_proj"], dropout=value))


def test_dropout_on_a_kind_without_it_is_refused_naming_key_and_kind():
    with pytest.raises(surgeon.SpecError, match=r"dropout.*unknown key for a 'loha' adapter"):
        surgeon.load_spec({"adapters": [{"name": "a", "type": "loha", "targets": ["*.q_proj"], "dropout": 0.1}]})


# ---------------------------------------------------------------- PEFT: forward, files, training

@pytest.mark.parametrize("config", [
    lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "down_proj"]),
    lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True, target_modules=["q_proj", "down_proj"]),
    lambda: peft.VeraConfig(r=4, vera_dropout=0.3, target_modules=["q_proj", "v_proj"]),
], ids=["lora", "dora", "vera"])
def test_train_mode_forward_matches_peft_with_dropout(config, tmp_path):
    """Imported with its dropout, the adapter draws the same masks as PEFT's layers (same ops, same order)."""
    model, args, wrapped = randomized_peft_checkpoint(config(), tmp_path)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]}, KW)
    assert compiled.adapters["p"].spec.options["dropout"] == 0.3
    module = compiled.module
    with torch.no_grad():
        torch.testing.assert_close(module(*args).logits, wrapped.eval()(*args, **KW).logits, rtol=1e-5, atol=1e-5)
        module.train(), wrapped.train()
        torch.manual_seed(11)
        want = wrapped(*args, **KW).logits
        torch.manual_seed(11)
        got = module(*args).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, wrapped.eval()(*args, **KW).logits, atol=1e-4), "the dropout acted"


@pytest.mark.parametrize("kind,key", [("lora", "lora_dropout"), ("dora", "lora_dropout"), ("vera", "vera_dropout")])
def test_dropout_round_trips_through_peft_configs(kind, key, tmp_path):
    model, args = hf_llama()
    extra = {"rank": 4} if kind == "vera" else {"rank": 4, "alpha": 8}
    spec = {"adapters": [{"name": "a", "type": kind, "targets": ["*.q_proj", "*.v_proj"], "dropout": 0.05, **extra}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    compiled.save_adapter("a", tmp_path / "out", format="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config[key] == 0.05
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out")
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert getattr(layer, key)["default"].p == 0.05                       # PEFT built its dropout from it
    again = surgeon.compile(model, args, {"adapters": [{"name": "b", "from_peft": str(tmp_path / "out")}]}, KW)
    assert again.adapters["b"].spec.options["dropout"] == 0.05


@pytest.mark.parametrize("config,key", [
    (lambda: peft.LoHaConfig(r=2, module_dropout=0.1, target_modules=["q_proj"]), "module_dropout"),
    (lambda: peft.LoKrConfig(r=2, rank_dropout=0.1, target_modules=["q_proj"]), "rank_dropout"),
    (lambda: peft.BOFTConfig(boft_block_size=4, boft_dropout=0.1, target_modules=["q_proj"]), "boft_dropout"),
    (lambda: peft.OFTConfig(oft_block_size=4, r=0, module_dropout=0.1, target_modules=["q_proj"]), "module_dropout"),
], ids=["loha", "lokr", "boft", "oft"])
def test_a_peft_dropout_surgeon_does_not_implement_is_refused_on_import(config, key, tmp_path):
    model, args, _ = randomized_peft_checkpoint(config(), tmp_path, scale=0.01)
    with pytest.raises(surgeon.SpecError, match=f"{key}=0.1 is not supported for a '"):
        surgeon.compile(model, args, {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]}, KW)


STEPS = 20


def _batches(seed: int = 0) -> list[torch.Tensor]:
    """Rows counting up from a random start (mod 128): a next token the adapters can learn."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (4, 1), generator=gen) + torch.arange(12)) % 128 for _ in range(STEPS)]


def _train(module, params, batches, compiled: bool, seeds) -> list[float]:
    """20 AdamW steps of next-token loss; the dropout masks come from torch.manual_seed(seeds[i])."""
    optimizer = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.01)
    module.train()
    losses = []
    for ids, seed in zip(batches, seeds):
        torch.manual_seed(seed)
        logits = (module(ids) if compiled else module(ids, **KW)).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    return losses


def _surgeon_and_peft(dropout: float, tmp_path):
    """A one-layer LLaMA with a LoRA (surgeon's init, then nudged so B != 0 and the first steps already
    move A), exported to PEFT; (model, args, compiled, a fresh PEFT copy of the same start)."""
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.v_proj"], rank=4, alpha=8, dropout=dropout), KW)
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    compiled.save_adapter("chat", tmp_path, format="peft")
    return model, args, compiled, lambda: peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path,
                                                                         is_trainable=True)


def _pairs(module, wrapped) -> tuple[dict, dict]:
    """The trainable adapter tensors of both by one key, e.g. 'model.layers.0.self_attn.q_proj.lora_A'."""
    ours = {n.replace(".adapter_chat.", "."): p for n, p in module.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
              for n, p in wrapped.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 4
    return ours, theirs


def _train_both(module, wrapped, seeds_ours, seeds_peft):
    ours, theirs = _pairs(module, wrapped)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "both start from the same adapter"
    batches = _batches()
    return (_train(module, list(ours.values()), batches, True, seeds_ours),
            _train(wrapped, [theirs[k] for k in ours], batches, False, seeds_peft), ours, theirs)


def test_lora_training_matches_peft_step_for_step(tmp_path):
    """Dropout 0: the same data, optimizer and start give the same losses and adapter weights after 20
    steps (measured: bit for bit)."""
    _, _, compiled, peft_model = _surgeon_and_peft(0.0, tmp_path)
    ours_losses, peft_losses, ours, theirs = _train_both(compiled.module, peft_model(), range(STEPS), range(STEPS))
    assert sum(ours_losses[-5:]) < sum(ours_losses[:5]) - 0.3, ours_losses     # it learns
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), rtol=1e-5, atol=1e-5)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_lora_training_with_dropout_tracks_peft(tmp_path):
    """Dropout 0.1. Independent masks (other seeds): the losses differ step by step, not on average.
    The same seeds: both draw the same masks (the same dropout ops on the same inputs in the same
    order) and train alike, which pins where the dropout acts. Eval outputs equal the merged model's."""
    _, args, compiled, peft_model = _surgeon_and_peft(0.1, tmp_path)
    start = copy.deepcopy(compiled.module)
    ours_losses, peft_losses, _, _ = _train_both(compiled.module, peft_model(), range(100, 120), range(200, 220))
    gaps = [a - b for a, b in zip(ours_losses, peft_losses)]
    # measured here over three seed pairs: per-step gaps of sd 0.017-0.020 (mask noise, and trajectories
    # that drift apart as the masks differ), |gap| <= 0.042, mean gaps of -0.010 to -0.001 on a mean loss
    # of 4.75 (<= 0.2%); bounded at 0.1 per step and 1% on average
    assert any(abs(g) > 1e-4 for g in gaps), "independent masks give different losses"
    assert max(abs(g) for g in gaps) < 0.1, gaps
    assert abs(sum(gaps) / STEPS) < 0.01 * sum(peft_losses) / STEPS, gaps
    assert sum(ours_losses[-5:]) < sum(ours_losses[:5]), ours_losses
    with torch.no_grad():                              # eval: dropout off, and merge is exact
        evaluated = compiled.module(*args).logits
    compiled.apply(["merge"])
    torch.testing.assert_close(compiled.module(*args).logits, evaluated, rtol=1e-5, atol=1e-5)
    ours_losses, peft_losses, ours, theirs = _train_both(start, peft_model(), range(300, 320), range(300, 320))
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(peft_losses), rtol=1e-5, atol=1e-5)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_model_the_fx_fallback_captures_gets_train_mode_dropout_too(monkeypatch):
    """symbolic_trace's front end used to delete nn.Dropout; it now writes the eval-mode dropout export
    writes, so the flag is gated the same way."""
    import sys

    capture_module = sys.modules["surgeon.capture"]

    def no_export(*args, **kwargs):
        raise RuntimeError("export refused (forced by the test)")

    monkeypatch.setattr(capture_module, "_capture_export", no_export)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    compiled = surgeon.compile(model, (torch.randn(4, 4),), {"adapters": []})
    assert compiled.module.meta["surgeon_frontend"] == "fx"
    x = torch.randn(4, 4)
    with torch.no_grad():
        assert torch.equal(compiled.module(x), model(x))
        compiled.module.train()
        first, second = compiled.module(x), compiled.module(x)
    assert not torch.equal(first, second) and (first == 0).any()
