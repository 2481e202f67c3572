"""LoRA options: PiSSA init (residual base weight), gaussian init, rsLoRA; PEFT parity for each."""
from __future__ import annotations

import pytest
import torch

from surgeon.graph import get_tensor
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)
from tests.conftest import assert_untouched, snapshot

peft = pytest.importorskip("peft")
TARGETS = ["*.q_proj", "*.down_proj"]


def _top(weight: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    return U[:, :rank] * S[:rank] @ Vh[:rank]


def test_pissa_lifecycle(tmp_path):
    model, args, compiled = compile_kind("lora", TARGETS, rank=4, alpha=8, init="pissa")
    before = snapshot(model)
    assert_identity_insert(compiled, model, args, exact=False)   # W_res + s B A == W up to rounding
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "model.layers.0.mlp.down_proj")
    original = model.model.layers[0].mlp.down_proj.weight.detach().double()
    residual = get_tensor(compiled.module, site.weight).detach().double()
    A, B = (get_tensor(compiled.module, site.params[p]).detach().double() for p in ("lora_A", "lora_B"))
    torch.testing.assert_close(2.0 * B @ A, _top(original, 4), rtol=1e-5, atol=1e-5)   # s = 8 / 4
    torch.testing.assert_close(residual, original - _top(original, 4), rtol=1e-5, atol=1e-5)
    assert_param_count(compiled, 2 * 4 * (64 + 64) + 2 * 4 * (128 + 64))
    assert_trains(compiled, args)
    assert_untouched(model, before)                                # the residual is a new tensor
    peft_export(compiled, model, args, tmp_path / "peft")          # PEFT recomputes the same residual
    assert_round_trip(compiled, model, args, tmp_path)             # so does a from_dir load
    assert_merge(compiled, args)


@pytest.mark.parametrize("options", [{"init": "gaussian"}, {"use_rslora": True}])
def test_gaussian_and_rslora_insert_exactly_and_train(options):
    model, args, compiled = compile_kind("lora", TARGETS, rank=4, alpha=8, **options)
    assert_identity_insert(compiled, model, args)
    assert_trains(compiled, args)


@pytest.mark.parametrize("options", [dict(init_lora_weights="pissa"), dict(use_rslora=True),
                                     dict(init_lora_weights="gaussian", rank_pattern={"down_proj": 2})])
def test_peft_parity(options, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **options)
    compiled = peft_parity(config, tmp_path)
    pissa = options.get("init_lora_weights") == "pissa"
    assert compiled.adapters[NAME].spec.options["init"] == ("pissa" if pissa else "default")
