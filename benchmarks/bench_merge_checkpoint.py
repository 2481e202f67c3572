"""Out-of-core merge of a synthetic multi-GB sharded checkpoint: throughput and peak RSS (prints).

Writes a sharded fp32 safetensors checkpoint of `--gib` GiB (square `--dim` x `--dim` tensors,
4 shards, written shard by shard) and a LoRA r=16 adapter on every tensor, then times
surgeon.merge_checkpoint and reads the process's peak resident memory (VmHWM, reset before the
merge through /proc/self/clear_refs) against the largest tensor's size.

    python benchmarks/bench_merge_checkpoint.py [--gib 2] [--dim 4096] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.adapter_io import save_adapter_dir
from surgeon.merge_checkpoint import merge_checkpoint


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_base(root: Path, count: int, dim: int, shards: int) -> None:
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    per, weight_map = -(-count // shards), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = [f"layers.{i}.proj.weight" for i in range(s * per, min(count, (s + 1) * per))]
        save_file({n: torch.randn(dim, dim, generator=gen) for n in names}, str(root / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": count * dim * dim * 4}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    ns = parser.parse_args()
    tensor_bytes = ns.dim * ns.dim * 4
    count = max(1, int(ns.gib * 2**30 // tensor_bytes))
    work = Path(tempfile.mkdtemp(prefix="surgeon-merge-bench-", dir=ns.dir))
    try:
        write_base(work / "base", count, ns.dim, shards=4)
        gen = torch.Generator().manual_seed(1)
        weights = {f"layers.{i}.proj": {"lora_A": torch.randn(16, ns.dim, generator=gen) * 0.01,
                                        "lora_B": torch.randn(ns.dim, 16, generator=gen) * 0.01} for i in range(count)}
        save_adapter_dir(work / "adapter", "a", "lora", {"rank": 16, "alpha": 16, "use_rslora": False,
                                                          "init": "default"}, weights, {})
        del weights
        Path("/proc/self/clear_refs").write_text("5")   # reset the peak RSS to the current RSS
        rss0 = status_bytes("VmRSS")
        start = time.perf_counter()
        summary = merge_checkpoint(work / "base", work / "adapter", work / "out")
        seconds = time.perf_counter() - start
        peak = status_bytes("VmHWM") - rss0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = count * tensor_bytes
    print(f"device: CPU ({platform.processor() or platform.machine()}), disk under {ns.dir}")
    print(f"checkpoint: {count} fp32 tensors of {ns.dim}x{ns.dim} ({tensor_bytes / 2**20:.0f} MiB each) in 4 shards, "
          f"{total / 2**30:.2f} GiB; LoRA r=16 merged into every tensor ({len(summary.merged)} merged)")
    print(f"merge time {seconds:.1f} s = {total / seconds / 1e9:.2f} GB/s (read + merge + write)")
    print(f"peak RSS growth during the merge: {peak / 2**20:.0f} MiB = {peak / tensor_bytes:.1f}x the largest "
          f"tensor, {peak / total:.3f}x the checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
