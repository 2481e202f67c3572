"""surgeon's fold-bn + reparameterize against timm's own `reparameterize_model` (prints; not a test).

One small model per timm family that timm can reparameterize (tests/timm_models.py FAMILIES), random
weights, non-trivial BN statistics (tests/passes/rep_models.randomize_bn), eval, fp32, no grad,
batch 1 at 224x224 (256x256 for FastViT, its default), 1 thread by default. For each model:

- convs and BNs: conv / batch_norm ops in the captured graph of the original model, of timm's
  `reparameterize_model` result, and of surgeon's graph after ["fold-bn", "reparameterize"];
- error: max |out - eager original| / max |eager original| for timm's and surgeon's results;
- time: surgeon's forward / timm's forward, the median over rounds of the per-round ratio, the two
  run interleaved (the order alternates each round).

    python benchmarks/bench_timm_reparameterize.py [--rounds 15] [--threads 1] [--size 224] [names...]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests.timm_models, tests.passes.rep_models

from bench_reparameterize import cpu_name  # noqa: E402  (this folder)
from tests.passes.rep_models import REP, randomize_bn  # noqa: E402
from tests.timm_models import FAMILIES, counts, import_timm  # noqa: E402


def ratio(a, b, rounds: int) -> float:
    """Median over rounds of time(a) / time(b), interleaved, the order alternating."""
    with torch.no_grad():
        a(), b()
        ratios = []
        for r in range(rounds):
            spent = {}
            for name, fn in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
                start = time.perf_counter()
                fn()
                spent[name] = time.perf_counter() - start
            ratios.append(spent["a"] / spent["b"])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("names", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import surgeon

    timm = import_timm(skip=False)
    from timm.utils.model import reparameterize_model
    print(f"device: {cpu_name()}, torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), "
          f"fp32, batch 1, no grad, {args.rounds} rounds")
    print("| timm model | input | convs original / timm / surgeon | BN original / timm / surgeon "
          "| rel. error timm / surgeon | surgeon time / timm time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.names:
        torch.manual_seed(0)
        model = randomize_bn(timm.create_model(name, pretrained=False))
        size = model.pretrained_cfg.get("input_size", (3, args.size, args.size))[1:] if args.size == 224 \
            else (args.size, args.size)
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        timm_model = reparameterize_model(copy.deepcopy(model)).eval()
        before = counts(surgeon.compile(model, (x,), {"pipeline": []}).module)
        after_timm = counts(surgeon.compile(timm_model, (x,), {"pipeline": []}).module)
        ours = surgeon.compile(model, (x,), REP).module
        after = counts(ours)
        with torch.no_grad():
            want = model(x)
            errs = [float((m(x) - want).abs().max() / want.abs().max()) for m in (timm_model, ours)]
        speed = ratio(lambda: ours(x), lambda: timm_model(x), args.rounds)
        convs, norms = (" / ".join(str(c[k]) for c in (before, after_timm, after)) for k in ("conv", "batch_norm"))
        print(f"| {name} | {'x'.join(map(str, size))} | {convs} | {norms} | {errs[0]:.1e} / {errs[1]:.1e} "
              f"| {speed:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
