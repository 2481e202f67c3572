"""Python cost of a lowered model's custom-op calls, with every Triton launch stubbed out (CPU; prints).

    python benchmarks/bench_launch_overhead.py [--rounds 15]

On a GPU a decode step of a small batch is launch-bound when it is not captured in a CUDA graph:
the GPU waits on the Python that issues each kernel. This measures that Python on the CPU. A tiny
LLaMA (2 layers, hidden 64, so that the arithmetic costs next to nothing) with LoRA r=8 on all
seven projections is lowered as `lower` does on a GPU; the dispatcher is told a GPU runs the
kernels (`dispatch.backend` -> "triton") and Triton's launch (`JITFunction.run`) does nothing, so
a forward is the custom ops' wrappers, the launchers and the torch ops left between regions.

Each region call is timed where the graph makes it (a wrapper around the op), and the eager base
model's whole forward is timed beside it: median microseconds over interleaved rounds, batch 1 x 1
token, fp32, no grad. Nothing here computes on a GPU; it is the Python a GPU would wait on.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def lowered(model, ids):
    """(unlowered, lowered) GraphModules of the model with LoRA r=8 on every projection."""
    import surgeon
    from surgeon.bench.models import TARGETS

    spec = {"adapters": [{"name": "a", "type": "lora", "targets": TARGETS, "rank": 8, "alpha": 16}],
            "pipeline": ["insert"]}
    unlowered = surgeon.compile(model, (ids,), spec, {"use_cache": False})
    low = surgeon.compile(model, (ids,), spec, {"use_cache": False})
    return unlowered.module, low.apply(["fuse", "lower"]).module


def stub_launches(monkeypatch_like: list) -> None:
    """Make the ops believe a GPU runs their kernels, and make each launch a no-op."""
    import triton.runtime.jit as jit

    from surgeon.kernels import dispatch

    for owner, name, value in ((dispatch, "backend", lambda device: "triton"),
                               (jit.JITFunction, "run", lambda self, *a, **kw: None)):
        monkeypatch_like.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)


def region_calls(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("surgeon.")]


def timed(gm) -> dict:
    """Wrap each region call of gm in a timer; returns op name -> [seconds, calls], filled as gm runs."""
    totals: dict = {}
    for node in region_calls(gm):
        entry = totals.setdefault(str(node.target).split(".")[1], [0.0, 0])
        node.target = _timer(node.target, entry)
    gm.recompile()
    return totals


def _timer(op, entry: list):
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = op(*args, **kwargs)
        entry[0] += time.perf_counter() - start
        entry[1] += 1
        return out
    call.__name__ = f"timed_{str(op).split('.')[1]}"
    return call


def median_us(fns: dict, rounds: int, calls: int = 100) -> dict:
    """Median microseconds per call of each fn, and of each region op per call, over interleaved rounds."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, totals) in fns.items():
            fn()
            for entry in totals.values():
                entry[:] = [0.0, 0]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
            for op, (seconds, n) in totals.items():
                times.setdefault(f"  {op}, per call", []).append(seconds / n * 1e6)
                times.setdefault(f"  {op}, per forward", []).append(seconds / calls * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 1))
    unlowered, low = lowered(model, ids)
    saved: list = []
    counts = dict(Counter(str(n.target).split(".")[1] for n in region_calls(low)))
    stub_launches(saved)
    try:
        totals = timed(low)
        with torch.no_grad():
            us = median_us({"eager base (HF), forward": (lambda: model(ids, use_cache=False), {}),
                            "surgeon unlowered, forward": (lambda: unlowered(ids), {}),
                            "surgeon lowered (launches stubbed), forward": (lambda: low(ids), totals)},
                           args.rounds)
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    print(f"CPU ({torch.get_num_threads()} thread), torch {torch.__version__}, batch 1 x 1 token, fp32, "
          f"no grad; region calls per forward: {counts}")
    for name, value in us.items():
        print(f"  {name:48s} {value:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
