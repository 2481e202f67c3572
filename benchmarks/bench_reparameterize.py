"""RepVGG-A0 multi-branch vs reparameterized: forward time, parameters, FLOPs (prints; not a test).

The network is RepVGG-A0-shaped: stages of RepVGG training-time blocks (3x3+BN, 1x1+BN, BN
identity where shapes allow; tests/passes/rep_models.py) with widths 48/48/96/192/1280 and
1/2/4/14/1 blocks, the first of each stage with stride 2, global pooling and a 1000-way linear;
fp32, no grad, 224x224 input, batch 1 and 8. Variants, all in one process and interleaved
round-robin (the order rotates each round): the eager multi-branch model, its captured graph
(surgeon.compile with an empty pipeline) and the graph after ["fold-bn", "reparameterize"].
A figure is the median over rounds of the variant's time; "speedup" is the median over rounds
of (captured multi-branch time / reparameterized time) in the same round.

    python benchmarks/bench_reparameterize.py [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests.passes.rep_models

from tests.passes.rep_models import REP, RepVGGBlock, randomize_bn, rel_err  # noqa: E402

WIDTHS, DEPTHS = (48, 48, 96, 192, 1280), (1, 2, 4, 14, 1)


class RepVGGA0(nn.Module):
    """RepVGG-A0 layout in training-time (multi-branch) form."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        blocks, cin = [], 3
        for width, depth in zip(WIDTHS, DEPTHS):
            for i in range(depth):
                blocks.append(RepVGGBlock(cin, width, stride=2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return f"{platform.machine()} CPU"


def flops(module: nn.Module, x: torch.Tensor) -> int:
    """conv + matmul FLOPs of one forward (torch FlopCounterMode; BN / add / relu not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def time_round_robin(fns: dict, rounds: int) -> tuple[dict[str, float], float]:
    """Median seconds per variant, and the median per-round ratio captured / reparameterized."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    with torch.no_grad():
        for f in fns.values():
            f()
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["captured multi-branch"], times["reparameterized"])]
    return {k: statistics.median(v) for k, v in times.items()}, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import surgeon
    from surgeon.graph import count_parameters

    torch.manual_seed(0)
    model = randomize_bn(RepVGGA0())
    example = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    captured = surgeon.compile(model, (example,), {"pipeline": []}).module
    compiled = surgeon.compile(model, (example,), REP)
    compile_s = time.perf_counter() - start
    rep = compiled.module
    print(f"device: {cpu_name()}, torch {torch.__version__}, "
          f"{args.threads} threads, fp32, no grad, {args.rounds} rounds; compile (both) {compile_s:.1f} s")
    print(compiled.report.rows[-2].name, compiled.report.rows[-2].matches, "matches;",
          compiled.report.rows[-1].name, compiled.report.rows[-1].matches, "matches,",
          len(compiled.report.rows[-1].rejections), "rejections;", "checks:",
          ", ".join(r.check for r in compiled.report.rows))
    convs = lambda gm: sum(1 for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target))  # noqa: E731
    print(f"params: multi-branch {count_parameters(captured)[0]:,} -> reparameterized {count_parameters(rep)[0]:,}; "
          f"conv2d ops {convs(captured)} -> {convs(rep)}")
    print(f"FLOPs (conv+linear, batch 1): multi-branch {flops(captured, example) / 1e9:.3f} G -> "
          f"reparameterized {flops(rep, example) / 1e9:.3f} G")
    print()
    print(f"{'batch':>5}  {'eager multi-branch':>18}  {'captured multi-branch':>21}  {'reparameterized':>15}  "
          f"{'speedup':>7}  {'rel err vs eager':>16}")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            err = rel_err(model(x), rep(x))
        fns = {"eager multi-branch": lambda: model(x), "captured multi-branch": lambda: captured(x),
               "reparameterized": lambda: rep(x)}
        medians, speedup = time_round_robin(fns, args.rounds)
        ms = [f"{medians[k] * 1e3:.1f} ms" for k in fns]
        print(f"{batch:>5}  {ms[0]:>18}  {ms[1]:>21}  {ms[2]:>15}  {speedup:>6.2f}x  {err:>16.1e}")


if __name__ == "__main__":
    main()
