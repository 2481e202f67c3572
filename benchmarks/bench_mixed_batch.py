"""Mixed batches: one adapter per row, generated with a KV cache, per generated token (issue 17's table).

The 4-layer LLaMA-style model of `surgeon bench` (hidden 512, GQA 8/4, vocab 2048; `--hidden` / `--layers`
scale it: at hidden 512 the r (in + out) factors of 16 adapters at a projection hold 0.7 to 1.5 times as
many numbers as its base weight, so a decode step whose rows use 16 distinct adapters reads about 1.7
times the bytes of one with a single adapter, a bound on the mixed per-token figure that wider models
relax), LoRA r=16 on all
7 projections, a bank of 16 adapters with random weights; a batch of 16 prompts (left-padded), rows
spread round-robin over 1, 4 or 16 adapters; greedy. Variants, each timed interleaved in every round
as a full generate and a one-token generate (the prefill); per token = (full - prefill) / (new - 1);
each figure is the median over rounds of the variant's time / the eager base model's:

  eager base               transformers' generate on the model without adapters
  surgeon one adapter      surgeon's generate with one adapter active, no adapter_names (unmerged)
  surgeon mixed            surgeon's generate with adapter_names (surgeon.serving's mixed graphs)
  PEFT mixed               peft's generate with adapter_names
  surgeon one at a time    surgeon, each adapter's rows as their own batch, one after another

    python benchmarks/bench_mixed_batch.py [--rounds 3] [--threads 2] [--new 16] [--prompt 32] [--spreads 1 4 16]
        [--skip "surgeon one at a time"] [--hidden 512] [--layers 4]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.bench.generate import measure, prompts  # noqa: E402
from surgeon.bench.models import TARGETS, build  # noqa: E402

BANK = 16
COLUMNS = ("surgeon one adapter", "surgeon mixed", "PEFT mixed", "surgeon one at a time")


def variants(model, ids, mask, spread: int, folder: Path) -> dict:
    import peft

    import surgeon

    spec = {"adapters": [{"name": f"a{i}", "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}
                         for i in range(BANK)], "pipeline": ["insert", {"activate": {"adapters": ["a0"]}}]}
    compiled = surgeon.compile(model, (ids[:2, :8],), spec, {"attention_mask": mask[:2, :8], "use_cache": False},
                               verify=False)
    gen = torch.Generator().manual_seed(1)
    for i in range(BANK):   # random weights, the same for surgeon and PEFT
        compiled.set_active(f"a{i}")
        with torch.no_grad():
            for p in compiled.module.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        compiled.save_adapter(f"a{i}", folder / f"a{i}", format="peft")
    compiled.set_active("a0")
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder / "a0", adapter_name="a0").eval()
    for i in range(1, BANK):
        wrapped.load_adapter(folder / f"a{i}", adapter_name=f"a{i}")
    names = [f"a{row % spread}" for row in range(ids.shape[0])]
    settings = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0}

    def one_at_a_time(n):
        for i in range(spread):
            rows = [r for r, name in enumerate(names) if name == f"a{i}"]
            compiled.set_active(f"a{i}")
            compiled.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=n, do_sample=False,
                              pad_token_id=0)
        compiled.set_active("a0")

    return {
        "eager base": lambda n: model.generate(ids, max_new_tokens=n, **settings),
        "surgeon one adapter": lambda n: compiled.generate(ids, max_new_tokens=n, **settings),
        "surgeon mixed": lambda n: compiled.generate(ids, max_new_tokens=n, adapter_names=names, **settings),
        "PEFT mixed": lambda n: wrapped.generate(input_ids=ids, max_new_tokens=n, adapter_names=names, **settings),
        "surgeon one at a time": one_at_a_time,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--spreads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--hidden", type=int, default=512, help="model width (surgeon.bench.models.build)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], choices=COLUMNS,
                        help="variants not to time (their cells print as -)")
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    model = build(hidden=ns.hidden, layers=ns.layers)
    model.generation_config.eos_token_id = None
    ids, mask = prompts(16, ns.prompt)
    print(f"CPU, {ns.threads} threads, torch {torch.__version__}, fp32; {ns.layers} layers, hidden {ns.hidden}; "
          f"batch 16, prompt {ns.prompt}, {ns.new} new "
          f"tokens, LoRA r=16 on 7 projections, a bank of {BANK}; per token / prefill, ratio to the eager base")
    print(f"{'adapters in the batch':<24}" + "".join(f"{k:>24}" for k in COLUMNS))
    with tempfile.TemporaryDirectory() as folder:
        for spread in ns.spreads:
            timed = {name: run for name, run in variants(model, ids, mask, spread, Path(folder)).items()
                     if name not in ns.skip}
            figures = measure(timed, ns.new, ns.rounds)
            cells = [f"{figures[name]['per token']:.2f}x / {figures[name]['prefill']:.2f}x" if name in figures
                     else "-" for name in COLUMNS]
            print(f"{spread:<24}" + "".join(f"{cell:>24}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
