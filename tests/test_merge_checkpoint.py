"""merge_checkpoint: out-of-core merge equals the in-memory merge pass, keeps layout, is atomic and lean."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgeon
import surgeon.merge_checkpoint as mc
from surgeon.adapter_io import save_adapter_dir
from surgeon.graph import get_tensor
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import logits

LORA_OPTS = {"rank": 4, "alpha": 4, "use_rslora": False, "init": "default"}


def write_checkpoint(state: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    """A HF-style checkpoint: model.safetensors, or n shards + model.safetensors.index.json."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "test"}')
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in names}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in names[i * per:(i + 1) * per]}
        save_file(chunk, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def merged_in_memory(model, args, spec, kwargs, adapter_dir: Path, fmt: str):
    """Compile + save the adapter, then run the merge pass: (merged weights by tensor name, logits)."""
    compiled = surgeon.compile(model, args, spec, kwargs)
    randomize_adapters(compiled.module, seed=7)
    compiled.save_adapter("a", adapter_dir, format=fmt)
    want_logits = logits(compiled.module, args)
    compiled.apply(["merge"])
    sites = compiled.adapters["a"].sites
    return {f"{s.path}.weight": get_tensor(compiled.module, s.weight).detach() for s in sites}, want_logits


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
def test_sharded_llama_equals_in_memory_merge(tmp_path, fmt):
    model, args = hf_llama()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(state, tmp_path / "base", shards=3)
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj", "*.k_proj", "*.down_proj"],
                          "rank": 4, "alpha": 8}]}
    merged, want_logits = merged_in_memory(model, args, spec, {"use_cache": False}, tmp_path / "adapter", fmt)
    inputs = digests(tmp_path / "base")
    summary = mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert digests(tmp_path / "base") == inputs                       # inputs untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(inputs)
    assert (tmp_path / "out" / "model.safetensors.index.json").read_bytes() == \
        (tmp_path / "base" / "model.safetensors.index.json").read_bytes()
    assert sorted(summary.merged) == sorted(merged) and summary.copied == len(state) - len(merged)
    for file in (tmp_path / "base").glob("*.safetensors"):             # same tensors in the same shard
        with safe_open(str(file), "pt") as a, safe_open(str(tmp_path / "out" / file.name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()
    out = read_all(tmp_path / "out")
    for name, tensor in state.items():
        assert torch.equal(out[name], merged.get(name, tensor)), name  # bit for bit
    fresh, _ = hf_llama()
    fresh.load_state_dict(out)
    torch.testing.assert_close(logits(fresh, args), want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
def test_single_file_gpt2_conv1d_layout(tmp_path, fmt):
    model, args = hf_gpt2()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    write_checkpoint(state, tmp_path / "base", shards=1)
    # c_attn is 32 -> 96 (stored 32 x 96), attn.c_proj is square: its layout comes from c_attn / PEFT
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.c_attn", "*.attn.c_proj"], "rank": 4}]}
    merged, _ = merged_in_memory(model, args, spec, {"use_cache": False}, tmp_path / "adapter", fmt)
    mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    out = read_all(tmp_path / "out")
    assert sorted(out) == sorted(state) and len(merged) == 4
    for name, tensor in state.items():
        assert torch.equal(out[name], merged.get(name, tensor)), name


def small_checkpoint(tmp_path: Path, targets=("layers.0.proj",)) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.proj.weight": torch.randn(8, 6, generator=gen) for i in range(4)}
    write_checkpoint(state, tmp_path / "base", shards=2)
    weights = {p: {"lora_A": torch.randn(4, 6, generator=gen), "lora_B": torch.randn(8, 4, generator=gen)}
               for p in targets}
    save_adapter_dir(tmp_path / "adapter", "a", "lora", LORA_OPTS, weights, {})


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    small_checkpoint(tmp_path, targets=("layers.0.proj", "layers.3.proj"))
    calls = []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(*args)

    original = mc.merged_tensor
    monkeypatch.setattr(mc, "merged_tensor", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert len(calls) == 2                                    # it failed in the second shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]   # no out, no temp folder


def test_refusals_name_what_is_wrong(tmp_path):
    small_checkpoint(tmp_path, targets=("layers.9.proj",))
    with pytest.raises(surgeon.SurgeonError, match="module 'layers.9.proj' has no 2-D tensor"):
        mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(surgeon.SurgeonError, match="exists; refusing to overwrite"):
        mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(surgeon.SurgeonError, match="has neither"):
        mc.merge_checkpoint(tmp_path / "adapter", tmp_path / "adapter", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_peak_memory_is_a_few_tensors_not_the_checkpoint(tmp_path):
    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")            # resets VmHWM (peak RSS) to the current RSS
    except OSError as error:
        pytest.skip(f"cannot reset the peak RSS here: {error}")
    rows = cols = 512                         # 1 MiB fp32 tensors, 96 of them: 96 MiB
    count, tensor_bytes = 96, rows * cols * 4
    gen = torch.Generator().manual_seed(0)
    for name, n in (("warm", 2), ("big", count)):   # a tiny run first: library pages it touches are not the merge's
        root = tmp_path / name
        write_checkpoint({f"layers.{i}.proj.weight": torch.randn(rows, cols, generator=gen) for i in range(n)},
                         root / "base", shards=1 if name == "warm" else 4)
        weights = {f"layers.{i}.proj": {"lora_A": torch.randn(4, cols, generator=gen) * 0.01,
                                        "lora_B": torch.randn(rows, 4, generator=gen) * 0.01}
                   for i in range(0, n, 2)}
        save_adapter_dir(root / "adapter", "a", "lora", LORA_OPTS, weights, {})
    mc.merge_checkpoint(tmp_path / "warm" / "base", tmp_path / "warm" / "adapter", tmp_path / "warm" / "out")
    clear_refs.write_text("5")
    start = _status_bytes("VmRSS")
    summary = mc.merge_checkpoint(tmp_path / "big" / "base", tmp_path / "big" / "adapter", tmp_path / "big" / "out")
    extra = _status_bytes("VmHWM") - start
    assert len(summary.merged) == count // 2
    # at most: the tensor, the LoRA delta (float32) and the merged result: 3 tensors' worth, plus 4 MiB of
    # slack (the allocator; the 2 MiB float64 piece buffer of a merge into a non-float32 weight); the whole
    # checkpoint is 96 tensors (measured 3.8; with float64 copies of the tensor and the delta it was 7.9)
    assert extra < 3 * tensor_bytes + 4 * 2**20, f"peak grew by {extra / 2**20:.1f} MiB"
    assert extra < count * tensor_bytes / 8


def test_quantized_adapter_merges_as_its_decoded_weights(tmp_path):
    from surgeon.quantized_io import dequantize, quantize, save_quantized_adapter

    model, args = hf_llama()
    write_checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp_path / "base", shards=2)
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.v_proj"], "rank": 4}]}
    quantized = surgeon.compile(model, args, spec, {"use_cache": False})
    reference = surgeon.compile(model, args, spec, {"use_cache": False})
    randomize_adapters(quantized.module, seed=2)
    with torch.no_grad():   # the reference holds the decoded float weights, then merges in memory
        for (name, p), (_, r) in zip(quantized.module.named_parameters(), reference.module.named_parameters()):
            if p.requires_grad:
                r.copy_(dequantize(quantize(p, bits=2, group_size=16, method="affine")))
    quantized.apply([{"quantize-adapters": {"bits": 2, "group_size": 16}}])
    save_quantized_adapter(quantized, "a", tmp_path / "adapter")
    reference.apply(["merge"])
    mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    out = read_all(tmp_path / "out")
    for site in reference.adapters["a"].sites:
        assert torch.equal(out[f"{site.path}.weight"], get_tensor(reference.module, site.weight))
