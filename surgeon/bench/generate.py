"""The generation table: tokens generated with a KV cache, as a model is served, per generated token.

The 4-layer LLaMA-style model of the whole-model table (hidden 512, GQA 8/4 heads, vocab 2048),
LoRA r=16 on all 7 projections, greedy, no end-of-sequence stop (every row makes the same number
of tokens). A prompt of `prompt` tokens (batch rows left-padded to different lengths), `new` new
tokens. Variants, each with its own cache:

  eager base        transformers' generate on the model without an adapter (the baseline)
  compile base      the same with torch.compile on its forward and a static cache (transformers'
                    recommended way to compile generation; where it compiles)
  surgeon merged    surgeon's generate (captured prefill + one-token decode graphs) after `merge`
  surgeon unmerged  the same with the LoRA branch running
  PEFT unmerged     peft's generate with the LoRA layers
  PEFT merged       peft after merge_and_unload

Each round times every variant twice, interleaved: a full generate and a one-token generate (the
prefill); per token = (full - prefill) / (new - 1). A figure is the median over rounds of the
variant's time / the eager base's in the same round (surgeon.bench.harness's convention).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch

from .models import TARGETS, build

VARIANTS = ("eager base", "compile base", "surgeon merged", "surgeon unmerged", "PEFT unmerged", "PEFT merged")


def prompts(batch: int, length: int, vocab: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask): `batch` prompts of `length` positions, row i left-padded by i tokens."""
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, :row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def generators(model, ids: torch.Tensor, mask: torch.Tensor, log=print) -> dict[str, Callable[[int], torch.Tensor]]:
    """Each variant as a function of the number of new tokens; a variant that cannot be built is logged."""
    import peft

    import surgeon

    spec = {"adapters": [{"name": "a", "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}],
            "pipeline": ["insert"]}
    example = ids[:, :8], mask[:, :8]
    unmerged = surgeon.compile(model, (example[0],), spec, {"attention_mask": example[1], "use_cache": False})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unmerged.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    merged = surgeon.compile(model, (example[0],), spec, {"attention_mask": example[1], "use_cache": False})
    merged.module.load_state_dict(unmerged.module.state_dict())
    merged.apply(["merge"])
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[t[2:] for t in TARGETS], lora_dropout=0.0)
    peft_unmerged = peft.get_peft_model(copy.deepcopy(model), config).eval()
    peft_merged = peft.get_peft_model(copy.deepcopy(model), config).eval().merge_and_unload()
    settings = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0}
    found = {
        "eager base": lambda n: model.generate(ids, max_new_tokens=n, **settings),
        "surgeon merged": lambda n: merged.generate(ids, max_new_tokens=n, **settings),
        "surgeon unmerged": lambda n: unmerged.generate(ids, max_new_tokens=n, **settings),
        "PEFT unmerged": lambda n: peft_unmerged.generate(input_ids=ids, max_new_tokens=n, **settings),
        "PEFT merged": lambda n: peft_merged.generate(ids, max_new_tokens=n, **settings),
    }
    try:
        compiled_base = copy.deepcopy(model)
        compiled_base.forward = torch.compile(compiled_base.forward)
        static = {**settings, "cache_implementation": "static"}
        with torch.no_grad():
            compiled_base.generate(ids, max_new_tokens=2, **static)    # compiles here, or fails here
        found["compile base"] = lambda n: compiled_base.generate(ids, max_new_tokens=n, **static)
    except Exception as error:  # noqa: BLE001 - reported; the other rows still run
        log(f"  compile base: left out ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
    return {name: found[name] for name in VARIANTS if name in found}


def measure(fns: dict[str, Callable[[int], torch.Tensor]], new: int, rounds: int) -> dict[str, dict[str, float]]:
    """{variant: {"per token": ratio, "prefill": ratio, "per token ms": ms}}, medians over interleaved rounds."""
    per_token = {k: [] for k in fns}
    prefill = {k: [] for k in fns}
    absolute = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():                       # warm at both lengths: graphs built, compiled, chosen
            f(1)
            f(new)
        for _ in range(rounds):
            full, first = {}, {}
            for name, f in fns.items():
                start = time.perf_counter()
                f(1)
                first[name] = time.perf_counter() - start
                start = time.perf_counter()
                f(new)
                full[name] = time.perf_counter() - start
            token = {k: max(full[k] - first[k], 1e-9) / (new - 1) for k in fns}
            for name in fns:
                per_token[name].append(token[name] / token["eager base"])
                prefill[name].append(first[name] / first["eager base"])
                absolute[name].append(token[name] * 1000)
    return {k: {"per token": statistics.median(per_token[k]), "prefill": statistics.median(prefill[k]),
                "per token ms": statistics.median(absolute[k])} for k in fns}


def run(rounds: int = 5, threads_list: tuple[int, ...] = (1, 2), batches: tuple[int, ...] = (1, 8),
        prompt: int = 128, new: int = 64, device: str = "cpu", dtype: str = "float32", log=print) -> dict:
    """The table: {"b<batch> t<threads>": {variant: figures}}."""
    model = build(device=device, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None     # every row makes `new` tokens
    model.generation_config.pad_token_id = 0
    rows = {}
    for batch in batches:
        ids, mask = prompts(batch, prompt)
        ids, mask = ids.to(device), mask.to(device)
        fns = generators(model, ids, mask, log)
        for threads in threads_list:
            torch.set_num_threads(threads)
            label = f"batch {batch}, {threads} thread{'s' * (threads > 1)}"
            log(f"  measuring {label} ...")
            rows[label] = measure(fns, new, rounds)
    return rows


def print_rows(rows: dict) -> None:
    for label, figures in rows.items():
        print(f"\n{label}: ratio to the eager base (transformers' generate with its own cache)")
        print(f"{'variant':<20}{'per token':>12}{'prefill':>12}{'ms / token':>14}")
        for name, f in figures.items():
            print(f"{name:<20}{f['per token']:>11.2f}x{f['prefill']:>11.2f}x{f['per token ms']:>14.2f}")
