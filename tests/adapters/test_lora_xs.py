"""LoRA-XS: frozen SVD bases of W, a trained r x r matrix between them."""
from __future__ import annotations

import torch

from surgeon.graph import get_tensor
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind)


def test_lora_xs_lifecycle(tmp_path):
    model, args, compiled = compile_kind("lora-xs", ["*.q_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args)     # R = 0
    site = next(s for s in compiled.adapters[NAME].sites if s.path == "model.layers.0.mlp.down_proj")
    A, B = (get_tensor(compiled.module, site.params[p]).double() for p in ("lora_A", "lora_B"))
    weight = model.model.layers[0].mlp.down_proj.weight.detach().double()
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(B @ A, U[:, :4] * S[:4] @ Vh[:4], rtol=1e-5, atol=1e-5)   # top-4 part of W
    assert_param_count(compiled, 4 * 4 * 4)            # r^2 per site, bases frozen
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)
