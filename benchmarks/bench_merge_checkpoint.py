"""Out-of-core merge of a sharded checkpoint: time against copying the same files, and peak RSS (prints).

Two checkpoints:
- default: a sharded fp32 safetensors checkpoint of `--gib` GiB (square `--dim` x `--dim` tensors, 4 shards,
  written shard by shard) and a LoRA r=16 adapter on every tensor;
- `--llama`: the 469 MiB fp32 LLaMA of tests/test_from_folder.py's peak-memory test (hidden 1024, 8 layers,
  intermediate 2816, 16 heads / 4 kv heads, vocab 16000, untied embeddings, written by save_pretrained in
  100 MB shards) with a LoRA r=16 on all 7 projections of every layer (56 of its 75 tensors merged).

It times surgeon.merge_checkpoint, reads the process's peak resident memory (VmHWM, reset before the merge
through /proc/self/clear_refs) against the largest tensor's size, and times `cp -r` of the base folder (the
floor: reading and writing the same bytes), medians over --repeat runs, merge and copy interleaved.

    python benchmarks/bench_merge_checkpoint.py [--gib 2] [--dim 4096] [--dir /tmp] [--repeat 3]
    python benchmarks/bench_merge_checkpoint.py --llama
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.adapter_io import save_adapter_dir
from surgeon.merge_checkpoint import merge_checkpoint

LORA = {"rank": 16, "alpha": 16, "use_rslora": False, "init": "default"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_square(work: Path, gib: float, dim: int) -> str:
    """The square-tensor checkpoint and its adapter; a line describing them."""
    root, shards = work / "base", 4
    tensor_bytes = dim * dim * 4
    count = max(1, int(gib * 2**30 // tensor_bytes))
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    per, weight_map = -(-count // shards), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = [f"layers.{i}.proj.weight" for i in range(s * per, min(count, (s + 1) * per))]
        save_file({n: torch.randn(dim, dim, generator=gen) for n in names}, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": count * tensor_bytes}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = {f"layers.{i}.proj": {"lora_A": torch.randn(16, dim, generator=gen) * 0.01,
                                    "lora_B": torch.randn(dim, 16, generator=gen) * 0.01} for i in range(count)}
    save_adapter_dir(work / "adapter", "a", "lora", LORA, weights, {})
    return f"{count} fp32 tensors of {dim}x{dim} ({tensor_bytes / 2**20:.0f} MiB each) in {shards} shards"


def write_llama(work: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)
    model.save_pretrained(work / "base", max_shard_size="100MB")
    weights = {}
    for name, tensor in model.named_parameters():
        if name.removesuffix(".weight").rpartition(".")[2] in PROJECTIONS:
            out_f, in_f = tensor.shape
            weights[name.removesuffix(".weight")] = {"lora_A": torch.randn(16, in_f, generator=gen) * 0.01,
                                                     "lora_B": torch.randn(out_f, 16, generator=gen) * 0.01}
    save_adapter_dir(work / "adapter", "a", "lora", {**LORA, "alpha": 32}, weights, {})
    shards = len(list((work / "base").glob("*.safetensors")))
    return (f"LLaMA hidden 1024, 8 layers, vocab 16000, fp32, {len(model.state_dict())} tensors in {shards} shards, "
            f"LoRA r=16 on all 7 projections")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--llama", action="store_true", help="the 469 MiB LLaMA checkpoint instead")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeat", type=int, default=3)
    ns = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surgeon-merge-bench-", dir=ns.dir))
    try:
        what = write_llama(work) if ns.llama else write_square(work, ns.gib, ns.dim)
        files = sorted((work / "base").glob("*.safetensors"))
        total = sum(p.stat().st_size for p in files)
        largest = max(t for p in files for t in _tensor_sizes(p))
        merges, copies, peaks, merged = [], [], [], 0
        for _ in range(ns.repeat):
            shutil.rmtree(work / "out", ignore_errors=True)
            Path("/proc/self/clear_refs").write_text("5")   # reset the peak RSS to the current RSS
            rss0 = status_bytes("VmRSS")
            start = time.perf_counter()
            summary = merge_checkpoint(work / "base", work / "adapter", work / "out")
            merges.append(time.perf_counter() - start)
            peaks.append(status_bytes("VmHWM") - rss0)
            merged = len(summary.merged)
            shutil.rmtree(work / "copy", ignore_errors=True)
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(work / "base"), str(work / "copy")], check=True)
            copies.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds, copy, peak = statistics.median(merges), statistics.median(copies), max(peaks)
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"disk under {ns.dir}, torch {torch.__version__}")
    print(f"checkpoint: {what}; {total / 2**20:.0f} MiB, {merged} tensors merged")
    print(f"merge_checkpoint {seconds:.2f} s = {total / seconds / 1e9:.2f} GB/s (read + merge + write), runs "
          f"{', '.join(f'{s:.2f}' for s in merges)}; cp -r of the same folder {copy:.2f} s ({seconds / copy:.1f}x)")
    print(f"peak RSS growth during the merge: {peak / 2**20:.0f} MiB = {peak / largest:.1f}x the largest "
          f"tensor, {peak / total:.3f}x the checkpoint")
    return 0


def _tensor_sizes(path: Path) -> list[int]:
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return [end - start for name, entry in header.items() if name != "__metadata__"
            for start, end in [entry["data_offsets"]]]


if __name__ == "__main__":
    raise SystemExit(main())
