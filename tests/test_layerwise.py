"""surgeon.layerwise: a merged checkpoint checked against its base checkpoint + adapters (unmerged) one block at a
time, and compile_pretrained's merge_to checked that way before it gets its name (docs/large_models.md)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import surgeon
import surgeon.merge_checkpoint as mc
from surgeon.cli import main
from surgeon.layerwise import LayerwiseError, LayerwiseUnsupported, split_model, verify_layerwise
from surgeon.pipeline import TOLERANCE, compare
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import logits
from tests.test_from_folder import CASES, digests, lora, save_folder

PARTS = {   # (blocks, other modules), in the order the forward calls them
    "llama_gqa": (["model.layers.0", "model.layers.1"], ["model.embed_tokens", "model.norm", "lm_head"]),
    "gpt2": (["transformer.h.0", "transformer.h.1"], ["transformer.wte", "transformer.wpe", "transformer.ln_f",
                                                      "lm_head"]),
}


@pytest.fixture(params=list(CASES))
def trained(request, tmp_path):
    """A sharded checkpoint folder, a trained (randomized, B != 0) LoRA adapter for it, and the in-memory model
    with the adapter unmerged (the full-model reference)."""
    build, targets, shard = CASES[request.param]
    model, ids = save_folder(build, tmp_path / "ckpt", shard)
    compiled = surgeon.compile(model, (ids,), lora(targets), {"use_cache": False})
    randomize_adapters(compiled.module, seed=7)
    compiled.save_adapter("a", tmp_path / "adapter")
    return request.param, compiled, ids, tmp_path


def from_dir(adapter: Path) -> dict:
    return {"adapters": [{"name": "a", "from_dir": str(adapter)}]}


def full_model_check(reference: torch.Tensor, folder: Path, ids: torch.Tensor) -> tuple[bool, str]:
    """The whole merged model loaded by transformers, compared with the unmerged model's logits as a pass is."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    return compare([reference], [logits(merged, (ids,))], "close", {torch.float32})


def rewrite(folder: Path, name: str, change) -> None:
    """Replace tensor `name` in its shard of `folder` (a copy the test made) by change(tensor)."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            if name not in handle.keys():
                continue
            tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}
            metadata = handle.metadata()
        tensors[name] = change(tensors[name])
        save_file(tensors, str(file), metadata=metadata)
        return
    raise AssertionError(f"{name} is in no shard of {folder}")


def test_merge_to_is_checked_layer_by_layer_and_agrees_with_the_full_model(trained):
    name, compiled, ids, tmp = trained
    reference = logits(compiled.module, (ids,))   # the whole model in memory, adapter unmerged
    before = digests(tmp / "ckpt")
    result_compiled = surgeon.compile_pretrained(tmp / "ckpt", from_dir(tmp / "adapter"), example=(ids,),
                                                 merge_to=tmp / "merged")
    assert digests(tmp / "ckpt") == before
    result = result_compiled.merged_checkpoint.verification
    blocks, others = PARTS[name]
    assert [c.path for c in result.blocks] == blocks and [c.path for c in result.others] == others
    assert result.example == tuple(ids.shape) and result.unreached == 0
    # every block carries the adapter: merged W x vs W x + s B A x differ by rounding, within fp32's tolerance
    assert all(c.mode == "close" and 0 < c.rel_err <= TOLERANCE[torch.float32] for c in result.blocks), result.blocks
    assert all(c.mode == "exact" and c.rel_err == 0 for c in result.others)
    assert str(result) == f"layer by layer, 2 blocks (+{len(others)} other modules), max rel err " \
                          f"{max(c.rel_err for c in result.blocks):.1e}"
    row = result_compiled.report.rows[-1]
    assert row.name == "merge_to" and row.check == str(result) and "layer by layer" in str(result_compiled.report)
    assert result_compiled.merged_checkpoint.out_dir == tmp / "merged"
    # the reference chain layer by layer is the whole unmerged model's forward
    ok, check = compare([reference], [result.reference], "close", {torch.float32})
    assert ok, check
    # and the whole merged model agrees with it too, as the blocks did
    ok, check = full_model_check(reference, tmp / "merged", ids)
    assert ok, check
    # what the check read: one module from one checkpoint at a time, never the model
    total = sum(p.stat().st_size for p in (tmp / "ckpt").glob("*.safetensors"))
    assert result.peak_bytes == result.largest_module_bytes < total / 2
    assert sorted(p.name for p in tmp.iterdir()) == ["adapter", "ckpt", "merged"]   # nothing left beside it


def test_a_corrupted_merged_shard_is_caught_and_names_the_block(trained):
    name, compiled, ids, tmp = trained
    reference = logits(compiled.module, (ids,))
    mc.merge_checkpoint(tmp / "ckpt", tmp / "adapter", tmp / "merged", fan_in_fan_out=name == "gpt2")
    assert verify_layerwise(tmp / "ckpt", tmp / "merged", tmp / "adapter", ids).max_rel_err > 0
    block, cls = ("model.layers.1", "LlamaDecoderLayer") if name == "llama_gqa" else ("transformer.h.1", "GPT2Block")
    adapted = f"{block}.mlp.down_proj.weight" if name == "llama_gqa" else f"{block}.mlp.c_fc.weight"
    untouched = f"{block}.input_layernorm.weight" if name == "llama_gqa" else f"{block}.ln_1.weight"
    shutil.copytree(tmp / "merged", tmp / "corrupt")
    before = {folder: digests(tmp / folder) for folder in ("ckpt", "corrupt", "adapter")}

    def bump(t):   # one weight of an adapted module moved by a few times the weights' spread
        t.view(-1)[3] += 0.1
        return t
    rewrite(tmp / "corrupt", adapted, bump)
    before["corrupt"] = digests(tmp / "corrupt")
    with pytest.raises(LayerwiseError, match=rf"merged checkpoint '.*corrupt' differs from base \+ adapters at "
                                             rf"{type(compiled.original).__name__}'s block 2 of 2 '{block}' \({cls}\): "
                                             r"relative error .* exceeds 1e-05"):
        verify_layerwise(tmp / "ckpt", tmp / "corrupt", tmp / "adapter", ids)
    ok, check = full_model_check(reference, tmp / "corrupt", ids)   # the whole model sees it too
    assert not ok, check
    assert {folder: digests(tmp / folder) for folder in before} == before   # everything only read

    # a tensor no adapter touches must be the base's bit for bit: one ulp of a norm weight is caught, though the
    # logits move by far less than the tolerance
    shutil.rmtree(tmp / "corrupt")
    shutil.copytree(tmp / "merged", tmp / "corrupt")
    rewrite(tmp / "corrupt", untouched, lambda t: torch.nextafter(t, t + 1))
    with pytest.raises(LayerwiseError, match=rf"block 2 of 2 '{block}' \({cls}\): its tensor '.*{untouched}', "
                                             "which no adapter touches, is not the base checkpoint's bit for bit"):
        verify_layerwise(tmp / "ckpt", tmp / "corrupt", tmp / "adapter", ids)
    assert full_model_check(reference, tmp / "corrupt", ids)[0]

    # outside the blocks: the embedding
    shutil.rmtree(tmp / "corrupt")
    shutil.copytree(tmp / "merged", tmp / "corrupt")
    embedding = "model.embed_tokens.weight" if name == "llama_gqa" else "transformer.wte.weight"
    rewrite(tmp / "corrupt", embedding, lambda t: t * 1.01)
    with pytest.raises(LayerwiseError, match=rf"module '{embedding.removesuffix('.weight')}' \(Embedding\)"):
        verify_layerwise(tmp / "ckpt", tmp / "corrupt", tmp / "adapter", ids)


def test_a_failed_check_leaves_merge_to_unwritten(tmp_path, monkeypatch):
    """A merge that computes something else (here: merge_checkpoint made to perturb one layer's q_proj) fails the
    check, and merge_to is not written; verify=False writes it unchecked and the report says so."""
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    compiled = surgeon.compile(model, (ids,), lora(["*.q_proj", "*.v_proj"]), {"use_cache": False})
    randomize_adapters(compiled.module, seed=3)
    compiled.save_adapter("a", tmp_path / "adapter")
    exact = mc.merged_tensor

    def wrong(tensor, target, adapter):
        merged = exact(tensor, target, adapter)
        return merged * 1.001 if target.path == "model.layers.1.self_attn.q_proj" else merged
    monkeypatch.setattr(mc, "merged_tensor", wrong)
    with pytest.raises(LayerwiseError, match=r"failed its layer-by-layer check, so nothing was written to merge_to "
                                             r"'.*merged' \(verify=False writes it unchecked\): .* differs from base "
                                             r"\+ adapters at LlamaForCausalLM's block 2 of 2 'model.layers.1'"):
        surgeon.compile_pretrained(tmp_path / "ckpt", from_dir(tmp_path / "adapter"), merge_to=tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ckpt"]   # no merge_to, no temporary folder
    unchecked = surgeon.compile_pretrained(tmp_path / "ckpt", from_dir(tmp_path / "adapter"),
                                           merge_to=tmp_path / "merged", verify=False)
    assert unchecked.merged_checkpoint.verification is None
    row = unchecked.report.rows[-1]
    assert row.name == "merge_to" and row.check == "skipped (verify=False)"
    assert any("not checked" in note for note in row.notes)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()


def test_several_adapters_are_nested_in_merge_order(tmp_path):
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    compiled = surgeon.compile(model, (ids,), {"adapters": [
        {"name": "a", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
        {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.down_proj"], "rank": 2}]}, {"use_cache": False})
    randomize_adapters(compiled.module, seed=3)
    reference = logits(compiled.module, (ids,))
    for adapter in ("a", "b"):
        compiled.save_adapter(adapter, tmp_path / adapter)
    spec = {"adapters": [{"name": n, "from_dir": str(tmp_path / n)} for n in ("a", "b")]}
    merged = surgeon.compile_pretrained(tmp_path / "ckpt", spec, example=(ids,), merge_to=tmp_path / "merged")
    result = merged.merged_checkpoint.verification
    assert len(result.blocks) == 2 and result.max_rel_err > 0
    assert compare([reference], [result.reference], "close", {torch.float32})[0]
    assert verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", compiled, ids).max_rel_err > 0   # a Compiled
    # checked against one of the two adapters, the merged checkpoint is wrong at the first block (b's down_proj)
    with pytest.raises(LayerwiseError, match=r"block 1 of 2 'model.layers.0' \(LlamaDecoderLayer\): its tensor "
                                             r"'model.layers.0.mlp.down_proj.weight', which no adapter touches"):
        verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "a", ids)
    # against both in the other order: LoRA's deltas add, so the order does not show; the nesting still runs
    assert verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", [tmp_path / "b", tmp_path / "a"], ids).blocks


def test_a_peft_adapter_and_a_bfloat16_model(tmp_path):
    """PEFT's folder format is read as merge_checkpoint reads it; a bf16 compile checks with bf16's tolerance."""
    model, ids = save_folder(hf_gpt2, tmp_path / "ckpt", "40KB")
    compiled = surgeon.compile(model, (ids,), lora(["*.c_attn", "*.c_fc"]), {"use_cache": False})
    randomize_adapters(compiled.module, seed=5)
    compiled.save_adapter("a", tmp_path / "peft", format="peft")
    mc.merge_checkpoint(tmp_path / "ckpt", tmp_path / "peft", tmp_path / "merged")
    result = verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "peft", (1, 12))
    assert result.example == (1, 12) and 0 < result.max_rel_err <= TOLERANCE[torch.float32]
    low = verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "peft", (1, 12), dtype="bfloat16")
    assert TOLERANCE[torch.float32] < low.max_rel_err <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("build, targets, entry", [
    (hf_gpt2, ["*.c_attn", "*.c_fc"], {"type": "lora", "rank": 4, "init": "pissa"}),   # base rewritten, Conv1D
    (hf_llama, ["*.q_proj", "*.down_proj"], {"type": "dora", "rank": 4}),             # reads the base weight
    (hf_llama, ["*.q_proj", "*.down_proj"], {"type": "oft", "block_size": 16}),       # rotates the input
    (hf_llama, ["*.v_proj", "*.down_proj"], {"type": "ia3"}),
], ids=["pissa-gpt2", "dora", "oft", "ia3"])
def test_other_kinds_run_their_own_forward_unmerged(tmp_path, build, targets, entry):
    model, ids = save_folder(build, tmp_path / "ckpt", "40KB" if build is hf_gpt2 else "100KB")
    compiled = surgeon.compile(model, (ids,), {"adapters": [{"name": "a", "targets": targets, **entry}]},
                               {"use_cache": False})
    randomize_adapters(compiled.module, seed=5)
    compiled.save_adapter("a", tmp_path / "adapter")
    mc.merge_checkpoint(tmp_path / "ckpt", tmp_path / "adapter", tmp_path / "merged", fan_in_fan_out=build is hf_gpt2)
    result = verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "adapter", ids)
    assert len(result.blocks) == 2 and 0 < result.max_rel_err <= TOLERANCE[torch.float32]
    ok, check = compare([logits(compiled.module, (ids,))], [result.reference], "close", {torch.float32})
    assert ok, check


def test_refusals_name_what_and_where(tmp_path):
    with pytest.raises(LayerwiseUnsupported, match="Sequential cannot be checked layer by layer: it has no "
                                                   "nn.ModuleList of repeated blocks"):
        split_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    compiled = surgeon.compile(model, (ids,), lora(["*.q_proj"]), {"use_cache": False})
    compiled.save_adapter("a", tmp_path / "adapter")
    mc.merge_checkpoint(tmp_path / "ckpt", tmp_path / "adapter", tmp_path / "merged")
    with pytest.raises(LayerwiseError, match="example must be None, a shape like"):
        verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "adapter", "2x8")
    with pytest.raises(LayerwiseError, match="adapters must be an adapter folder"):
        verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerwiseError, match=r"the merged checkpoint '.*empty': .* has neither"):
        verify_layerwise(tmp_path / "ckpt", tmp_path / "empty", tmp_path / "adapter")
    # a merged checkpoint that lost a tensor
    shutil.copytree(tmp_path / "merged", tmp_path / "short")
    index = json.loads((tmp_path / "short" / "model.safetensors.index.json").read_text())
    gone = "model.layers.0.mlp.up_proj.weight"
    shard = tmp_path / "short" / index["weight_map"].pop(gone)
    with safe_open(str(shard), "pt") as handle:
        tensors = {k: handle.get_tensor(k).clone() for k in handle.keys() if k != gone}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (tmp_path / "short" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LayerwiseError, match=rf"hold different tensors \(e.g. '{gone}'\)"):
        verify_layerwise(tmp_path / "ckpt", tmp_path / "short", tmp_path / "adapter")
    # an adapter for another model
    gpt2, (gpt2_ids,) = hf_gpt2()
    other = surgeon.compile(gpt2, (gpt2_ids,), lora(["*.c_attn"]), {"use_cache": False})
    other.save_adapter("a", tmp_path / "gpt2_adapter")
    with pytest.raises(LayerwiseError, match=r"names module 'transformer.h.0.attn.c_attn', which LlamaForCausalLM "
                                             r"\(built from '.*ckpt.config.json'\) lacks"):
        verify_layerwise(tmp_path / "ckpt", tmp_path / "merged", tmp_path / "gpt2_adapter")


def test_a_second_adapter_reading_the_base_weight_cannot_be_checked(tmp_path):
    """DoRA after a LoRA on one module: DoRA's forward reads the weight it sits on, which in the sequential merge is
    the LoRA's merged weight, a tensor no checkpoint holds: refused, and compile_pretrained writes nothing."""
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    compiled = surgeon.compile(model, (ids,), {"adapters": [
        {"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 4},
        {"name": "d", "type": "dora", "targets": ["*.q_proj"], "rank": 2}]}, {"use_cache": False})
    randomize_adapters(compiled.module, seed=7)
    for adapter in ("a", "d"):
        compiled.save_adapter(adapter, tmp_path / adapter)
    spec = {"adapters": [{"name": n, "from_dir": str(tmp_path / n)} for n in ("a", "d")]}
    with pytest.raises(LayerwiseUnsupported, match=r"cannot be checked layer by layer, so nothing was written to "
                                                   r"merge_to .*: verify_layerwise: adapter 'd' \(dora\) at "
                                                   r"'model.layers.0.self_attn.q_proj' reads the module's weight"):
        surgeon.compile_pretrained(tmp_path / "ckpt", spec, merge_to=tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ckpt", "d"]
    surgeon.compile_pretrained(tmp_path / "ckpt", spec, merge_to=tmp_path / "merged", verify=False)
    # the DoRA alone on the LoRA-merged checkpoint is checked: its base weight is then a checkpoint's
    mc.merge_checkpoint(tmp_path / "ckpt", tmp_path / "a", tmp_path / "step")
    assert verify_layerwise(tmp_path / "step", tmp_path / "merged", tmp_path / "d", ids).max_rel_err > 0


def test_cli_merge_to_prints_the_check_and_no_verify_merge_skips_it(tmp_path, capsys):
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    compiled = surgeon.compile(model, (ids,), lora(["*.up_proj"]), {"use_cache": False})
    randomize_adapters(compiled.module, seed=11)
    compiled.save_adapter("a", tmp_path / "adapter")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"adapters:\n  - {{name: a, from_dir: '{tmp_path / 'adapter'}'}}\n")
    base = ["compile", "--model", f"hf:{tmp_path / 'ckpt'}", "--spec", str(spec), "--example-shape", "1x8"]
    assert main([*base, "--merge-to", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "checked against the folder with the adapters unmerged: layer by layer, 2 blocks" in printed
    assert main([*base, "--merge-to", str(tmp_path / "unchecked"), "--no-verify-merge"]) == 0
    printed = capsys.readouterr().out
    assert "not checked (--no-verify-merge)" in printed and "skipped (verify=False)" in printed
    assert digests(tmp_path / "merged") == digests(tmp_path / "unchecked")
    assert main([*base, "--out", str(tmp_path / "out"), "--no-verify-merge"]) == 2
    assert "--no-verify-merge needs --merge-to" in capsys.readouterr().err
