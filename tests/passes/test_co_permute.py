"""co-permute / un-permute: selected units first and contiguous, every coupled tensor follows, the
function is unchanged, the inverse restores every tensor bit for bit, and refusals name the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.errors import PassError
from surgeon.groups import analyze_groups
from surgeon.groups.permute import apply, unit_perm_to_elements
from tests.conftest import (assert_untouched, hf_gpt2, hf_llama, lora_spec, randomize_adapters, small_cnn,
                            snapshot)
from tests.passes.helpers import logits
from tests.test_groups import _Poisoned, scramble

KW = {"use_cache": False}
L0 = "model.layers.0"


def _spec(*pipeline, adapters=()):
    return {"adapters": list(adapters), "pipeline": list(pipeline)}


def _tensor(module, name: str) -> torch.Tensor:
    """A parameter or buffer by name (tied names included)."""
    return (dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers()))[name]


def _segment(tensor, member, index=None):
    piece = tensor.detach().narrow(member["axis"], member["start"], member["stop"] - member["start"])
    return piece if index is None else piece.index_select(member["axis"], torch.as_tensor(index))


@pytest.mark.parametrize("factory,kwargs,tensors_per_group", [
    (hf_llama, KW, {f"{L0}.mlp": 3, f"{L0}.self_attn:heads": 2, f"{L0}.self_attn:kv-heads": 2}),
    (hf_gpt2, KW, {"transformer.h.0.attn": 3, "transformer.h.0.mlp": 3, "transformer.h.1.mlp": 3}),
    (small_cnn, None, {"block1": 7}),          # conv out + bias, BN weight/bias/mean/var, next conv in
])
def test_selected_units_come_first_and_the_function_is_unchanged(factory, kwargs, tensors_per_group):
    model, args = factory()
    before = snapshot(model)
    want = logits(model, args)
    compiled = surgeon.compile(model, args, _spec({"co-permute": {"ffn_fraction": 0.25, "head_fraction": 0.5}}),
                               kwargs)
    torch.testing.assert_close(logits(compiled.module, args), want)
    entries = {e["group"]: e for e in compiled.module.meta["surgeon_permutations"][-1]["groups"]}
    assert any(e["perm"] != sorted(e["perm"]) for e in entries.values()), "some real permutation"
    for key, count in tensors_per_group.items():
        e = entries[key]
        assert len({m["tensor"] for m in e["members"]}) == count
        first = unit_perm_to_elements(e["selected"], e["unit"])
        for m in e["members"]:
            new, old = _tensor(compiled.module, m["tensor"]), _tensor(model, m["tensor"])
            assert torch.equal(_segment(new, m), _segment(old, m, e["perm"]))
            assert torch.equal(_segment(new, m).narrow(m["axis"], 0, len(first)), _segment(old, m, first))
    assert compiled.report.rows[-1].matches == sum(1 for e in entries.values() if e["kind"] != "kv-heads")
    assert_untouched(model, before)


def test_un_permute_restores_every_tensor_bit_for_bit():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, _spec({"co-permute": {"ffn_fraction": 0.5, "head_fraction": 0.5}},
                                                  {"permute-nm": {"n": 2, "m": 4}}, "un-permute"), KW)
    assert [r.notes[0].split(":")[0] for r in compiled.report.rows[-1:]] == ["undid permute-nm"]
    assert compiled.module.meta["surgeon_permutations"] == []
    for name, param in model.named_parameters():
        assert torch.equal(compiled.module.get_parameter(name), param), name


def test_explicit_select_by_module_path():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, _spec({"co-permute": {"select": {f"{L0}.mlp": [40, 3, 17]}}}), KW)
    new, old = compiled.module.get_parameter, model.get_parameter
    assert torch.equal(new(f"{L0}.mlp.down_proj.weight")[:, :3], old(f"{L0}.mlp.down_proj.weight")[:, [3, 17, 40]])
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(new(f"{L0}.mlp.{name}.weight")[:3], old(f"{L0}.mlp.{name}.weight")[[3, 17, 40]])
    untouched = "model.layers.1.mlp.down_proj.weight"      # shares storage with the user's weight
    assert new(untouched).data_ptr() == model.get_parameter(untouched).data_ptr()
    assert compiled.report.rows[-1].matches == 1


def test_gqa_whole_groups_move_query_heads_with_their_kv_head():
    model, args = hf_llama()        # 4 query heads, 2 kv heads, head_dim 16: head 3 lives in kv group 1
    compiled = surgeon.compile(model, args, _spec({"co-permute": {"select": {f"{L0}.self_attn": [3]}}}), KW)
    new, old = compiled.module.get_parameter, model.get_parameter
    attn = f"{L0}.self_attn"
    assert torch.equal(new(f"{attn}.q_proj.weight")[:32], old(f"{attn}.q_proj.weight")[32:])
    assert torch.equal(new(f"{attn}.o_proj.weight")[:, :32], old(f"{attn}.o_proj.weight")[:, 32:])
    for kv in ("k_proj", "v_proj"):
        assert torch.equal(new(f"{attn}.{kv}.weight")[:16], old(f"{attn}.{kv}.weight")[16:])
    torch.testing.assert_close(logits(compiled.module, args), logits(model, args))


def test_gqa_within_moves_query_heads_inside_their_group_only():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, _spec({"co-permute": {"select": {f"{L0}.self_attn": [1, 3]},
                                                                   "gqa": "within"}}), KW)
    new, old = compiled.module.get_parameter, model.get_parameter
    q = f"{L0}.self_attn.q_proj.weight"
    assert torch.equal(new(q), old(q)[[*range(16, 32), *range(0, 16), *range(48, 64), *range(32, 48)]])
    for kv in ("k_proj", "v_proj"):
        name = f"{L0}.self_attn.{kv}.weight"
        assert new(name).data_ptr() == old(name).data_ptr()
    torch.testing.assert_close(logits(compiled.module, args), logits(model, args))


def test_residual_stream_is_refused_unless_asked():
    model, args = hf_llama()
    with pytest.raises(PassError, match="residual: residual add at add_[0-9]+ \\(aten.add.Tensor, model.layers.0\\)"):
        surgeon.compile(model, args, _spec({"co-permute": {"select": {"<root>": [0, 5]}}}), KW)
    compiled = surgeon.compile(model, args, _spec({"co-permute": {"select": {"<root>": [0, 5]},
                                                                   "allow_residual": True}}), KW)
    entry = compiled.module.meta["surgeon_permutations"][-1]["groups"][0]
    assert len({m["tensor"] for m in entry["members"]}) == 21     # embed, 5 norms, 14 projections, lm_head
    torch.testing.assert_close(logits(compiled.module, args), logits(model, args))


def test_a_group_behind_an_op_without_a_rule_is_refused_with_the_op():
    x = torch.randn(3, 8)
    model = _Poisoned(scramble)
    key = analyze_groups(surgeon.capture(model, (x,)))["groups"][0]["key"]      # up's output channels
    with pytest.raises(PassError, match=r"no transfer rule for this op at scramble \(surgeon_groups_test.scramble"):
        surgeon.compile(model, (x,), _spec({"co-permute": {"select": {key: [0]}}}))
    compiled = surgeon.compile(model, (x,), _spec({"co-permute": {"ffn_fraction": 0.5}}))
    assert compiled.report.rows[-1].matches == 1                                # up2 -> down2 only
    assert any("scramble" in reason for _, reason in compiled.report.rows[-1].rejections)


def test_unknown_group_names_the_eligible_ones():
    model, args = small_cnn()
    with pytest.raises(PassError, match="eligible groups: block1"):
        surgeon.compile(model, args, _spec({"co-permute": {"select": {"block2": [0]}}}))


def test_lora_b_rows_move_with_the_base_rows():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.up_proj"], rank=2), KW)
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply([{"co-permute": {"select": {f"{L0}.mlp": [7, 9]}}}])
    torch.testing.assert_close(logits(compiled.module, args), before)
    entry = compiled.module.meta["surgeon_permutations"][-1]["groups"][0]
    assert any("lora_B" in m["tensor"] for m in entry["members"])


def test_a_partial_permutation_would_change_the_function():
    """The checks above can fail: permuting the producers without the consumer breaks the model."""
    model, args = hf_llama()
    gm = surgeon.capture(model, args, KW)
    group = next(g for g in analyze_groups(gm)["groups"] if g["key"] == f"{L0}.mlp")
    producers = [m for m in group["members"] if m["role"] == "out"]
    apply(gm, [{"perm": list(reversed(range(group["size"]))), "members": producers}])
    assert not torch.allclose(logits(gm, args), logits(model, args), atol=1e-3)


class _GqaPinnedKv(nn.Module):
    """Grouped-query attention whose key projection is also a model output: kv heads cannot move."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.k, self.v = nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        keys = self.k(x)
        q = self.q(x).view(b, s, 4, 4).transpose(1, 2)
        k, v = (t.view(b, s, 2, 4).transpose(1, 2).repeat_interleave(2, 1) for t in (keys, self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(out.transpose(1, 2).reshape(b, s, 16)), keys


def test_gqa_groups_fall_back_to_within_when_kv_heads_are_pinned():
    model, x = _GqaPinnedKv().eval(), torch.randn(2, 5, 16)
    compiled = surgeon.compile(model, (x,), _spec({"co-permute": {"select": {"<root>:heads": [1, 3]}}}))
    assert any("cannot move" in note for note in compiled.report.rows[-1].notes)
    (entry,) = compiled.module.meta["surgeon_permutations"][-1]["groups"]
    assert entry["perm"] == unit_perm_to_elements([1, 0, 3, 2], 4) and entry["layout"] == "first-in-block"
    for name in ("k.weight", "v.weight"):
        assert compiled.module.get_parameter(name).data_ptr() == model.get_parameter(name).data_ptr()
    with torch.no_grad():
        for got, want in zip(compiled.module(x), model(x)):
            torch.testing.assert_close(got, want)
