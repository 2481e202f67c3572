"""Shared checks for adapter kinds: identity insert, training, merge, parameter count, file round
trips, and parity with PEFT (import of a PEFT checkpoint, export back to PEFT).

Every check drives the public path: surgeon.compile with a spec, Compiled.module, Compiled.apply,
Compiled.save_adapter and `from_dir` / `from_peft` entries.
"""
from __future__ import annotations

import copy

import torch

import surgeon
from surgeon.adapter_io import save_peft_dir
from surgeon.pipeline import TOLERANCE
from tests.conftest import hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits

KW = {"use_cache": False}
NAME = "ad"


def spec(kind: str, targets, pipeline=("insert",), **options) -> dict:
    return {"adapters": [{"name": NAME, "type": kind, "targets": list(targets), **options}],
            "pipeline": list(pipeline)}


def compile_kind(kind: str, targets, factory=hf_llama, **options):
    """(model, args, compiled) with one adapter of `kind` inserted."""
    model, args = factory()
    return model, args, surgeon.compile(model, args, spec(kind, targets, **options), KW)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within the pipeline's fp32 tolerance: max |got - want| / max |want|."""
    rel = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert rel <= TOLERANCE[torch.float32], f"relative error {rel:.3g}"


def assert_identity_insert(compiled, model, args, exact: bool = True) -> None:
    """The inserted adapter leaves the model's function unchanged (bit for bit when exact)."""
    row = compiled.report.rows[-1]
    assert row.name == "insert" and row.matches > 0
    assert row.check == "exact" if exact else row.check.startswith("rel err"), row.check
    with torch.no_grad():
        want = model(*args, **KW).logits
    got = logits(compiled.module, args)
    if exact:
        assert torch.equal(got, want)
    else:
        assert_close(got, want)


def assert_param_count(compiled, expected: int) -> None:
    """The kind's formula, the report and the module's trainable parameters all agree."""
    state = compiled.adapters[NAME]
    assert state.param_count == expected
    assert compiled.report.to_dict()["adapters"][0]["params"] == expected
    assert f"{expected:,}" in str(compiled.report)
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == expected


def assert_trains(compiled, args, steps: int = 4) -> list[float]:
    """A few Adam steps on a toy regression reduce the loss; only adapter parameters get gradients."""
    module, state = compiled.module, compiled.adapters[NAME]
    kind = state.spec.kind
    trainable = {t for s in state.sites for p, t in s.params.items() if p not in kind.untrained}
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable
    params = [module.get_parameter(t) for t in sorted(trainable)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(logits(module, args).shape, generator=torch.Generator().manual_seed(0))
    initial = [p.detach().clone() for p in params]
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(module(*args).logits, target)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in params)
        assert all(p.grad is None for p in module.parameters() if not p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial)), "every adapter parameter was updated"
    return losses


def assert_merge(compiled, args, unmerge: bool = True) -> None:
    """Merge leaves no adapter node or parameter and the same outputs; unmerge brings them back."""
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    params_before = sum(p.numel() for p in compiled.module.parameters())
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    assert not [n for n, _ in compiled.module.named_parameters() if f"adapter_{NAME}" in n]
    assert_close(logits(compiled.module, args), before)
    if unmerge:
        compiled.apply(["unmerge"])
        assert adapter_nodes(compiled.module, NAME)
        assert sum(p.numel() for p in compiled.module.parameters()) == params_before
        assert_close(logits(compiled.module, args), before)


def assert_round_trip(compiled, model, args, tmp_path) -> None:
    """save_adapter + a `from_dir` spec on the untouched model reproduce the outputs exactly."""
    randomize_adapters(compiled.module, seed=3)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "saved")}]}, KW)
    assert again.adapters["again"].spec.type == compiled.adapters[NAME].spec.type
    assert torch.equal(logits(again.module, args), expected)


def assert_dropout_in_training_only(compiled, args) -> None:
    """With the adapter's dropout on: train mode drops (outputs change), eval mode is deterministic and equal
    to what it was before training mode was entered."""
    randomize_adapters(compiled.module)
    evaluated = logits(compiled.module, args)
    assert torch.equal(logits(compiled.module, args), evaluated)
    compiled.module.train()
    torch.manual_seed(0)
    with torch.no_grad():
        trained = compiled.module(*args).logits
    compiled.module.eval()
    assert not torch.allclose(trained, evaluated)
    assert torch.equal(logits(compiled.module, args), evaluated)


def randomized_peft_checkpoint(config, tmp_path, scale: float = 0.2, factory=hf_llama):
    """(model, args, PEFT model): the `factory`'s model wrapped by PEFT with `config`, adapter weights moved off
    their init by seeded noise (as training would), saved to `tmp_path`."""
    import peft

    model, args = factory()
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    wrapped.save_pretrained(tmp_path)
    return model, args, wrapped


def peft_parity(config, tmp_path, scale: float = 0.2, factory=hf_llama):
    """A randomized PEFT checkpoint imports through `from_peft` and matches PEFT before and after merge."""
    model, args, wrapped = randomized_peft_checkpoint(config, tmp_path, scale, factory)
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), logits(wrapped.merge_and_unload(), args))
    return compiled


def peft_export(compiled, model, args, tmp_path) -> None:
    """An adapter trained in surgeon, written in PEFT's format, loads in PEFT with the same outputs."""
    import peft

    state = compiled.adapters[NAME]
    randomize_adapters(compiled.module, seed=5)
    expected = logits(compiled.module, args)
    site_options = {s.path: {k: v for k, v in s.options.items() if v != state.spec.options[k]} for s in state.sites}
    save_peft_dir(tmp_path, state.spec.options, compiled.adapter_weights(NAME),
                  {s.path for s in state.sites if s.op == "addmm"}, kind=state.spec.type, site_options=site_options)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert_close(logits(loaded, args), expected)


def model_inputs(factory) -> tuple:
    """(model, args, example kwargs) from any tests.conftest factory; decoders get KW (use_cache=False)."""
    made = factory()
    model, args, kwargs = made if len(made) == 3 else (*made, {})
    return model, args, {**(KW if hasattr(model, "generation_config") else {}), **kwargs}


def main_output(module, args, kwargs, grad: bool = False) -> torch.Tensor:
    """The model's main output tensor (logits, BERT's last hidden state, or a plain tensor); a compiled
    module takes only the tensor kwargs (the others were fixed at capture)."""
    if isinstance(module, torch.fx.GraphModule):
        kwargs = {key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)}
    with torch.set_grad_enabled(grad):
        out = module(*args, **kwargs)
    return next(getattr(out, key) for key in ("logits", "last_hidden_state") if hasattr(out, key)) \
        if not isinstance(out, torch.Tensor) else out


def assert_merge_checkpoint_matches(config, tmp_path, changed: int = 4, scale: float = 0.2) -> None:
    """A randomized PEFT checkpoint merged on disk (merge_checkpoint, one tensor at a time) writes exactly the
    weights the in-memory `merge` pass makes, and changes `changed` of them."""
    from safetensors.torch import load_file

    from surgeon.merge_checkpoint import merge_checkpoint

    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "peft", scale=scale)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    compiled.apply(["merge"])
    model.save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged")
    on_disk, ours = load_file(tmp_path / "merged" / "model.safetensors"), dict(compiled.module.named_parameters())
    base = model.state_dict()
    names = [name for name, tensor in on_disk.items() if name in ours and not torch.equal(tensor, base[name])]
    assert len(names) == changed, names
    for name in names:
        assert torch.equal(on_disk[name], ours[name]), name


def assert_edited_checkpoint_refused(config, tmp_path, edit, message: str) -> None:
    """A randomized PEFT checkpoint, its config (dict) and tensors changed by `edit(config, tensors)`, is refused
    at import with a SpecError matching `message`."""
    import json

    import pytest
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    config_path, tensors_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    stored, tensors = json.loads(config_path.read_text()), load_file(tensors_path)
    edit(stored, tensors)
    config_path.write_text(json.dumps(stored))
    save_file(tensors, tensors_path)
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
