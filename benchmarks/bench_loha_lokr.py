"""LoHa and LoKr, unmerged, against the eager base model and PEFT (prints; not a test).

    python benchmarks/bench_loha_lokr.py [--rounds 15] [--threads 2]

The 4-layer LLaMA-style model of `surgeon bench` (hidden 512, intermediate 1376), one adapter on
all 7 projections: LoHa r = 8 (alpha 16) and LoKr r = 8 (alpha 16, PEFT's default factorization).
surgeon runs LoHa on a linear site as a rank-r^2 LoRA (face-splitting identity) and LoKr as
W1 X W2^T; PEFT (and surgeon before) builds the out x in delta on every forward. Rows: forward
(no grad) at decode (1 x 4 tokens) and prefill (4 x 128), and one training step (forward,
backward of the mean logit, prefill shape). Every figure is the median over interleaved rounds of
variant time / the eager base model's forward time in the same round.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from surgeon.bench.models import TARGETS, build

KW = {"use_cache": False}


def variants(model, kind: str, ids) -> dict:
    import peft

    import surgeon

    spec = {"adapters": [{"name": "a", "type": kind, "targets": TARGETS, "rank": 8, "alpha": 16}],
            "pipeline": ["insert"]}
    ours = surgeon.compile(model, (ids,), spec, KW).module
    config = (peft.LoHaConfig if kind == "loha" else peft.LoKrConfig)(
        r=8, alpha=16, target_modules=[t[2:] for t in TARGETS])
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():             # nonzero adapter weights (the work per forward is the same either way)
        for p in [p for m in (ours, theirs) for p in m.parameters() if p.requires_grad]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return {"surgeon": lambda x: ours(x).logits, "PEFT": lambda x: theirs(x, **KW).logits}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(rounds: int) -> dict[str, dict[str, float]]:
    model = build()
    base = lambda x: model(x, **KW).logits  # noqa: E731
    shapes = {"decode 1x4": (1, 4), "prefill 4x128": (4, 128)}
    inputs = {label: torch.randint(0, 2048, shape, generator=torch.Generator().manual_seed(0))
              for label, shape in shapes.items()}
    fns = {}       # per shape (surgeon captures static shapes): {label: {variant: fn}}
    for label, x in inputs.items():
        found = {k: variants(model, k, x) for k in ("loha", "lokr")}
        fns[label] = {"eager base": base, **{f"{kind} {who}": fn for kind, pair in found.items()
                                             for who, fn in pair.items()}}
    table: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for label, x in inputs.items():
            with torch.no_grad():
                times = {name: timed(lambda: fn(x)) for name, fn in fns[label].items()}
            for name, t in times.items():
                table.setdefault(name, {}).setdefault(f"forward {label}", []).append(t / times["eager base"])
        x = inputs["prefill 4x128"]
        with torch.no_grad():
            reference = timed(lambda: base(x))
        for name, fn in fns["prefill 4x128"].items():
            if name != "eager base":
                table[name].setdefault("train step prefill", []).append(
                    timed(lambda: fn(x).float().mean().backward()) / reference)
    return {name: {col: statistics.median(v) for col, v in cols.items()} for name, cols in table.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_loha_lokr", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    rows = run(ns.rounds)
    columns = list(dict.fromkeys(c for cols in rows.values() for c in cols))
    print(f"CPU, {ns.threads} threads, torch {torch.__version__}, fp32; ratio to the eager base forward "
          f"(median of {ns.rounds} interleaved rounds)")
    print(f"{'variant':<16}" + "".join(f"{c:>22}" for c in columns))
    for name, cols in rows.items():
        print(f"{name:<16}" + "".join(f"{cols[c]:>21.2f}x" if c in cols else f"{'-':>22}" for c in columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
