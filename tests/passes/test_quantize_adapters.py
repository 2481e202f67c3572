"""quantize-adapters: hand-packed codes, exact byte counts, in-graph decode, error vs bits."""
from __future__ import annotations

import json
import re
import struct

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from surgeon.quantized_io import (dequantize, load_quantized_adapter, quantize, read_quantized_adapter,
                                  save_quantized_adapter)
from tests.conftest import hf_llama, lora_spec, randomize_adapters
from tests.passes.helpers import logits, op_counts


def test_codes_and_scales_hand_computed():
    # sign, group of 8 holding 3 values: s = (0.5 + 1.5 + 2) / 3; codes 1,0,1 -> byte 0b101 = 5
    q = quantize(torch.tensor([[0.5, -1.5, 2.0]]), bits=1, group_size=8, method="sign")
    assert q.packed.tolist() == [5] and q.scales.tolist() == pytest.approx([4 / 3])
    torch.testing.assert_close(dequantize(q), torch.tensor([[4 / 3, -4 / 3, 4 / 3]]))
    # affine 2-bit: min 0, max 3 -> scale 1, codes 0,1,2,3 | 1 -> bytes 0 + 1<<2 + 2<<4 + 3<<6 = 228, then 1
    q = quantize(torch.tensor([0.0, 1.0, 2.0, 3.0, 1.4]), bits=2, group_size=8, method="affine")
    assert q.packed.tolist() == [228, 1] and q.scales.tolist() == [1.0] and q.minimum.tolist() == [0.0]
    assert dequantize(q).tolist() == [0.0, 1.0, 2.0, 3.0, 1.0]
    # ternary, density 0.5 keeps 3 and -2: s = 2.5, codes 1,0,2,1 -> 1 + 0<<2 + 2<<4 + 1<<6 = 97
    q = quantize(torch.tensor([0.1, -2.0, 3.0, -0.2]), bits=2, group_size=8, method="ternary", density=0.5)
    assert q.packed.tolist() == [97, 0] and q.scales.tolist() == [2.5]
    assert dequantize(q).tolist() == [0.0, -2.5, 2.5, 0.0]


def test_sign_scale_is_the_least_squares_scale():
    w = torch.randn(64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, bits=1, group_size=64, method="sign")
    assert q.scales.item() == pytest.approx(w.abs().mean().item())
    error = lambda s: (w - s * torch.where(w >= 0, 1.0, -1.0)).square().sum().item()  # noqa: E731
    best = q.scales.item()
    assert error(best) < error(best * 1.01) and error(best) < error(best * 0.99)


def test_decode_keeps_dtype_and_shape_for_padded_groups():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = quantize(w, bits=4, group_size=16, method="affine")
    assert q.packed.numel() == 3 * 16 // 2                 # 35 entries -> 3 groups of 16, 2 codes a byte
    out = dequantize(q)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 7)
    assert (out.float() - w.float()).abs().max() <= q.scales.max() / 2 + 1e-2


def _compiled(targets=("*.q_proj",), train=True):
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(list(targets), name="a"), {"use_cache": False})
    if train:
        randomize_adapters(compiled.module, seed=5)
    return compiled, args


def test_one_bit_structure_and_exact_bytes(tmp_path):
    compiled, args = _compiled()
    params_before = sum(p.numel() for p in compiled.module.parameters())
    compiled.apply([{"quantize-adapters": {"bits": 1}}])
    module = compiled.module
    assert compiled.adapters["a"].status == "quantized"
    assert not [n for n, _ in module.named_parameters() if "adapter_a" in n]
    buffers = {n: b for n, b in module.named_buffers() if "adapter_a" in n}
    assert sorted({n.rsplit(".", 1)[1] for n in buffers}) == ["lora_A_packed", "lora_A_scales", "lora_B_packed",
                                                              "lora_B_scales"]
    assert sum(p.numel() for p in module.parameters()) == params_before - 2 * 2 * 256
    counts = op_counts(module)
    assert counts["bitwise_right_shift"] == 4 and counts["bitwise_and"] == 4   # 2 modules x (A, B)
    # q_proj: A 4x64 and B 64x4, 256 entries each = 4 groups of 64:
    # 256 / 8 = 32 packed bytes + 4 float32 scales = 48 B per tensor; 4 tensors -> 192 B; fp32 4 * 1,024 B
    assert "192 B stored vs 4,096 B fp32 (21.3x smaller), 2,048 B bf16 (10.7x)" in compiled.report.rows[-1].notes[0]
    save_quantized_adapter(compiled, "a", tmp_path / "a")
    blob = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    header = struct.unpack("<Q", blob[:8])[0]
    assert len(blob) == 8 + header + 192
    assert len(json.loads(blob[8:8 + header])) == 8                  # 2 modules x 2 tensors x (packed, scales)
    config, tensors = read_quantized_adapter(tmp_path / "a")
    assert config["type"] == "lora" and sorted(tensors) == ["model.layers.0.self_attn.q_proj",
                                                           "model.layers.1.self_attn.q_proj"]
    stored = tensors["model.layers.0.self_attn.q_proj"]["lora_A"]
    assert torch.equal(stored.packed, buffers["model.layers.0.self_attn.q_proj.adapter_a.lora_A_packed"])


@pytest.mark.parametrize("bits,group,per_tensor", [
    (2, 64, 256 // 4 + 4 * 4 + 4 * 4),     # affine: packed + scales + minima
    (4, 32, 256 // 2 + 8 * 4 + 8 * 4),
    (8, 128, 256 + 2 * 4 + 2 * 4),
])
def test_stored_bytes_follow_bits_and_groups(tmp_path, bits, group, per_tensor):
    compiled, _ = _compiled(train=False)
    compiled.apply([{"quantize-adapters": {"bits": bits, "group_size": group}}])
    assert f"{4 * per_tensor:,} B stored vs 4,096 B fp32" in compiled.report.rows[-1].notes[0]
    save_quantized_adapter(compiled, "a", tmp_path / "a")
    blob = (tmp_path / "a" / "adapter.safetensors").read_bytes()
    assert len(blob) == 8 + struct.unpack("<Q", blob[:8])[0] + 4 * per_tensor


def test_graph_decodes_exactly_like_eager_and_loads_back(tmp_path):
    compiled, args = _compiled(targets=("*.q_proj", "*.v_proj"))
    reference, _ = _compiled(targets=("*.q_proj", "*.v_proj"))
    with torch.no_grad():   # the reference runs float LoRA weights equal to the decoded ones
        for name, p in reference.module.named_parameters():
            if "adapter_a" in name:
                p.copy_(dequantize(quantize(p, bits=4, group_size=64, method="affine")))
    compiled.apply([{"quantize-adapters": {"bits": 4}}])
    torch.testing.assert_close(logits(compiled.module, args), logits(reference.module, args), rtol=0, atol=0)
    save_quantized_adapter(compiled, "a", tmp_path / "a")
    loaded = load_quantized_adapter(tmp_path / "a")
    assert loaded.entry["type"] == "lora" and loaded.entry["rank"] == 4
    for site in reference.adapters["a"].sites:
        for pname, target in site.params.items():
            assert torch.equal(loaded.weights[site.path][pname], get_tensor(reference.module, target))


def _errors(note: str) -> tuple[float, float]:
    found = re.search(r"output rel err ([\d.e+-]+) .* delta rel err ([\d.e+-]+)", note)
    return float(found.group(1)), float(found.group(2))


def test_error_shrinks_as_bits_grow():
    errors = []
    for bits in (1, 2, 4, 8):
        compiled, _ = _compiled(targets=("*.q_proj", "*.v_proj"))
        compiled.apply([{"quantize-adapters": {"bits": bits, "group_size": 32}}])
        errors.append(_errors(compiled.report.rows[-1].notes[0]))
    output, delta = zip(*errors)
    assert list(output) == sorted(output, reverse=True) and len(set(output)) == 4
    assert list(delta) == sorted(delta, reverse=True) and len(set(delta)) == 4
    assert 0 < output[-1] < 0.05


def test_untrained_adapter_quantizes_to_the_same_function():
    compiled, args = _compiled(train=False)     # LoRA B = 0: every B scale is 0, decoded B is exactly 0
    before = logits(compiled.module, args)
    compiled.apply([{"quantize-adapters": {"bits": 2, "method": "ternary", "density": 0.3}}])
    torch.testing.assert_close(logits(compiled.module, args), before, rtol=0, atol=0)


@pytest.fixture(scope="module")
def untrained():
    return _compiled(train=False)[0]


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "must be one of 1, 2, 4, 8"),
    ({"bits": 4, "method": "sign"}, "method 'sign' stores 1-bit codes, not 4"),
    ({"bits": 1, "method": "ternary"}, "method 'ternary' stores 2-bit codes, not 1"),
    ({"bits": 4, "group_size": 12}, "must be a positive multiple of 8"),
    ({"bits": 4, "density": 0.5}, "only the ternary method takes a density"),
    ({"bits": 4, "method": "nf4"}, "must be one of \[.affine., .sign., .ternary.\]"),
])
def test_bad_options_are_spec_errors(untrained, options, message):
    with pytest.raises(surgeon.SpecError, match=message):
        untrained.apply([{"quantize-adapters": options}])
    assert untrained.adapters["a"].status == "inserted"
