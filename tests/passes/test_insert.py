"""insert: LoRA branches appear around exactly the targeted linears; outputs bit-for-bit unchanged."""
from __future__ import annotations

import pytest
import torch

import surgeon
from tests.conftest import hf_gpt2, hf_llama, lora_spec
from tests.passes.helpers import adapter_nodes, logits, op_counts

KW = {"use_cache": False}


def test_insert_lora_llama_structure_numerics_and_counts():
    model, args = hf_llama()
    before = surgeon.compile(model, args, {"adapters": []}, KW).module
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.v_proj"], rank=4), KW)
    after = compiled.module
    # Before: 15 linears. After: + 2 per site (x A^T, h B^T) and one add carrying the scale.
    sites = 2 * 2
    b, a = op_counts(before), op_counts(after)
    assert a["linear"] - b["linear"] == 2 * sites and a["add"] - b["add"] == sites
    assert len(adapter_nodes(after, "chat")) == sites * 5   # 2 get_attr + 2 linear + 1 add
    row = compiled.report.rows[-1]
    assert (row.name, row.matches, row.rejections, row.check) == ("insert", sites, [], "exact")
    assert torch.equal(logits(after, args), logits(model, args))
    adds = [n for n in adapter_nodes(after) if "add" in str(n.target)]
    assert all(n.kwargs["alpha"] == 2.0 for n in adds)        # alpha 8 / rank 4
    assert all(n.meta["surgeon_pass"] == "insert" for n in adapter_nodes(after))


def test_only_adapter_parameters_train_and_the_user_model_does_not_change():
    model, args = hf_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.v_proj"], rank=4), KW)
    trainable = {n for n, p in compiled.module.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_chat." in n for n in trainable)
    assert all(p.requires_grad for p in model.parameters())     # the user's flags are theirs
    optimizer = torch.optim.SGD([p for p in compiled.module.parameters() if p.requires_grad], lr=0.5)
    base_before = {n: p.clone() for n, p in compiled.module.named_parameters() if not p.requires_grad}
    for _ in range(3):
        loss = compiled.module(*args).logits.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for n, p in compiled.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n])
    lora_b = [p for n, p in compiled.module.named_parameters() if n.endswith("lora_B")]
    assert all(p.abs().sum() > 0 for p in lora_b)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])


def test_insert_on_gpt2_conv1d_and_rejection_report():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, lora_spec(["*.attn.*"], rank=4), KW)
    state = compiled.adapters["chat"]
    assert sorted(s.path.split(".")[-1] for s in state.sites) == ["c_attn", "c_attn", "c_proj", "c_proj"]
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    # `*.attn.*` also selects attention's dropout modules, which have no linear op: reported, not adapted
    rejected = compiled.report.rows[-1].rejections
    assert rejected and all("has no linear/addmm/conv2d op a 'lora' adapter attaches to" in why for _, why in rejected)


def test_param_count_matches_formula():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*_proj"], rank=4), KW)
    # per layer: q,o 64x64; k,v 64->32; gate,up 64->128; down 128->64
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert compiled.adapters["chat"].param_count == 2 * per_layer
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == 2 * per_layer
    assert f"{2 * per_layer:,}" in str(compiled.report)


def test_insert_leaves_no_unread_parameter_reads():
    """A kind with two halves reads its parameters only in the half its options use (IA3 `on: output`)."""
    model, args = hf_llama(layers=1)
    spec = {"adapters": [{"name": "i", "type": "ia3", "targets": ["*.k_proj"]}], "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    assert not [n.name for n in compiled.module.graph.nodes if n.op == "get_attr" and not n.users]


class _ThreeLinears(torch.nn.Module):
    """`unused` is adapted by PEFT (it is an nn.Linear) but never runs; `grouped` is a grouped conv
    (LoRA takes it with a rank that is a multiple of its groups)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.grouped = torch.nn.Conv2d(4, 4, 1, groups=2)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return h + self.grouped(h.view(-1, 4, 2, 1)).reshape(h.shape)


def _peft_folder(model, targets, tmp_path):
    import copy

    import peft

    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=targets,
                                                                          init_lora_weights=False))
    wrapped.save_pretrained(tmp_path)
    return wrapped.eval()


def test_an_import_that_cannot_place_every_module_is_refused_naming_them(tmp_path):
    """Before: 'unused' was dropped without a word (2 of 3 placed); on RegNet two grouped convs were
    left out and the output missed PEFT's by 8.7e-2 with no error."""
    torch.manual_seed(0)
    model, x = _ThreeLinears().eval(), torch.randn(2, 8)
    _peft_folder(model, ["a", "b", "unused"], tmp_path / "unused")
    with pytest.raises(surgeon.SpecError, match=r"adapters\[0\]\.from_peft: 1 of the 3 modules p's checkpoint holds "
                                                r"tensors for were not placed: 'unused' \(lora_A, lora_B\): no linear"):
        surgeon.compile(model, (x,), {"adapters": [{"name": "p", "from_peft": str(tmp_path / "unused")}]})


def test_the_reason_a_module_was_rejected_is_named_and_allow_partial_imports_the_rest(tmp_path):
    from surgeon.adapter_io import save_adapter_dir

    torch.manual_seed(0)
    model, x = _ThreeLinears().eval(), torch.randn(2, 8)
    gen = torch.Generator().manual_seed(1)
    weights = {"a": {"lora_A": torch.randn(2, 8, generator=gen), "lora_B": torch.randn(8, 2, generator=gen)},
               "grouped": {"lora_A": torch.randn(1, 4, generator=gen), "lora_B": torch.randn(4, 1, generator=gen)}}
    save_adapter_dir(tmp_path / "grouped", "p", "lora", {"rank": 2, "alpha": 2}, weights, {"grouped": {"rank": 1}})
    spec = {"name": "p", "from_dir": str(tmp_path / "grouped")}
    with pytest.raises(surgeon.SpecError, match=r"'grouped' \(lora_A, lora_B\): grouped conv2d \(groups=2\): "
                                                r"LoRA's rank 1 is not a multiple of groups"):
        surgeon.compile(model, (x,), {"adapters": [spec]})
    compiled = surgeon.compile(model, (x,), {"adapters": [{**spec, "allow_partial": True}]})
    assert [s.path for s in compiled.adapters["p"].sites] == ["a"]
    assert any(n.startswith("WARNING (allow_partial): 1 of the 2 modules") for n in compiled.report.rows[-1].notes)
    with pytest.raises(surgeon.SpecError, match="allow_partial: must be true or false"):
        surgeon.load_spec({"adapters": [{**spec, "allow_partial": "yes"}]})
