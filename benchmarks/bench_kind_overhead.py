"""What each adapter kind costs unmerged: decode and prefill against the base model (prints; not a test).

    python benchmarks/bench_kind_overhead.py [--rounds 15] [--threads 2] [--kinds lora dora ...]
        [--layers 4] [--hidden 512] [--prompt 128] [--out kind_overhead.md]

The model: transformers' LlamaForCausalLM from a LlamaConfig with random weights (default 4 layers,
hidden 512, intermediate 1376, 8 heads, 4 key/value heads, vocab 2000), fp32 on the CPU, no grad.
Every kind of surgeon.adapters.kinds() gets a row, set up by surgeon.bench.kind_setups: a kind that
attaches to linear sites is inserted on all seven projections (q, k, v, o, gate, up, down) with its
default options, except rank 16 where the kind has a `rank` (less where a site takes less) and the shape
options its own checks need (the largest value up to its default that fits every site). Its SETUPS give
the others their natural sites and what they need (the table's `sites` column says which): ln_tuning on
every RMSNorm, trainable_tokens on 8 rows of embed_tokens, prefix and adaption_prompt on every self_attn
(its SDPA call), the virtual-token kinds (prompt_tuning, p_tuning, multitask_prompt_tuning, cpt: 8 tokens)
on embed_tokens, poly routed by a task id given with each call, s2ft on down_proj after `co-permute`,
delta (a full in x out update per site) on the projections. Every kind's trainable parameters get seeded
noise added, so no branch multiplies by a zero factor. A kind with neither linear sites nor a SETUPS
entry is listed as skipped, with its reason.

What runs is what surgeon's `generate` runs, found by a short generate first:

  cache      the compiled module's prefill and one-token decode graphs (`Compiled.generator`), called
             directly over a preallocated KV cache of prompt + 1 positions
  recompute  where generate takes no KV cache (virtual tokens lengthen the sequence; or the cache graphs
             do not reproduce the module: the list under the table says why): the compiled module itself on the
             whole sequence, its last position's logits, as surgeon.generate's recompute run calls it

  prefill  batch 1, the prompt's tokens, the last position's logits
  decode   one token after the prompt: cache, over the cache that prefill filled (each call writes the
           same cache position, so every call does the same work); recompute, the module on prompt + 1

The baseline `eager base` is the untouched transformers model running the forward those graphs are
captured from (surgeon.generate's cache wrapper) on the same inputs, so a recompute row's decode is its
whole-sequence step against the base's cached one: what a user pays per token. The row `(no adapter)`
is surgeon's graphs with no adapter inserted (the captured graph's own cost, for reading a kind's row
against it). Every variant runs once per round, round-robin; a figure is the median over rounds of its
time / the eager base's in the same round (surgeon.bench.harness.interleaved). A kind that fails to
compile or run gets a row with its error's first line; the others still run. The output's header has
the machine's load average before and after (os.getloadavg: 1, 5, 15 minutes).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.bench.harness import interleaved  # noqa: E402
from surgeon.bench.kind_setups import (DEFAULT_RANK, PROJECTIONS, SETUPS, Setup, fitted_options,  # noqa: E402
                                       site_dims, skip_reason)

DECODE_CALLS, PREFILL_CALLS = 10, 2      # calls per variant per round (a decode step is the shorter)
NOISE = 0.02                              # scale of the seeded noise added to every trainable parameter
BASE, NONE = "eager base", "(no adapter)"


def build(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, seed: int = 0):
    """The LLaMA-shaped model, random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


class Steps:
    """A prefill and a decode step of one variant over its own KV cache (prompt + 1 positions)."""

    def __init__(self, prefill: Callable, decode: Callable, layout, ids: torch.Tensor):
        length = ids.shape[1]
        self.prefill_fn, self.decode_fn, self.ids = prefill, decode, ids
        self.kv = [torch.zeros(1, heads, length + 1, dim) for heads, key_dim, value_dim in layout
                   for dim in (key_dim, value_dim)]
        self.prefill_mask = torch.ones(1, length + 1, dtype=torch.long)
        self.prefill_mask[:, length] = 0
        self.positions = torch.arange(length).unsqueeze(0)
        self.token, self.decode_mask = ids[:, -1:].clone(), torch.ones(1, length + 1, dtype=torch.long)
        self.start, self.past = torch.tensor(0), torch.tensor(length)

    def prefill(self) -> torch.Tensor:
        return self.prefill_fn(self.ids, self.prefill_mask, self.positions, self.start, *self.kv)

    def decode(self) -> torch.Tensor:
        return self.decode_fn(self.token, self.decode_mask, self.past.view(1, 1), self.past, *self.kv)


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Recompute:
    """generate's recompute path (surgeon.generate's recompute run, one row, no padding): the compiled module on
    the whole sequence, its last position's logits; prefill on the prompt, decode on prompt + 1 token."""

    def __init__(self, module, ids: torch.Tensor):
        from surgeon.generate import _RecomputeRun

        module.eval()                          # as generate runs it
        longer = torch.cat([ids, ids[:, -1:]], dim=1)
        self.prefill = _RecomputeRun(module, ids, torch.ones_like(ids)).start
        self.decode = _RecomputeRun(module, longer, torch.ones_like(longer)).start


class Routed:
    """A variant's steps with the task ids held for each call, as `generate(..., task_ids=...)` holds them."""

    def __init__(self, steps, task_ids: tuple[int, ...]):
        self.steps, self.task_ids = steps, list(task_ids)

    def prefill(self) -> torch.Tensor:
        from surgeon.routing import given

        with given(self.task_ids):
            return self.steps.prefill()

    def decode(self) -> torch.Tensor:
        from surgeon.routing import given

        with given(self.task_ids):
            return self.steps.decode()


def compile_noisy(model, ids: torch.Tensor, adapters: list[dict], before: tuple = ()):
    """(Compiled, trainable parameters): `adapters` inserted (after the passes `before`), their trainable
    parameters given seeded noise."""
    import surgeon

    spec = {"adapters": adapters, "pipeline": [*before, "insert"] if adapters else []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        compiled = surgeon.compile(model, (ids[:, :8],), spec, {"use_cache": False}, verify=False)
    trainable = [p for p in compiled.module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=gen) * NOISE)
    return compiled, sum(p.numel() for p in trainable)


def generation_steps(compiled, ids: torch.Tensor, task_ids: tuple[int, ...] | None = None):
    """(steps, generator, why recompute or ""): the path a short generate took (which checks the cache graphs
    against the compiled module's own forward), over the prompt `ids`."""
    from surgeon.adapters.virtual_tokens import lengthening
    from surgeon.adapters.xlora import recomputing
    from surgeon.routing import given

    with warnings.catch_warnings(record=True), given(task_ids):   # a fall back to recompute warns: its note
        compiled.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
    generator = compiled.generator
    if generator is None or generator.mode not in ("cache", "recompute"):
        raise RuntimeError(getattr(generator, "notes", ["no generator"])[-1])
    if lengthening(generator.ctx):
        why = "virtual tokens lengthen the sequence, so generate keeps no KV cache"
    elif recomputing(generator.ctx):
        why = "X-LoRA's scaling pass reads the whole sequence, so generate keeps no KV cache"
    elif generator.mode == "cache" and generator.graphs:
        graphs = generator.graphs
        steps = Steps(lambda *a: _logits(graphs["prefill"].gm(*a)), lambda *a: _logits(graphs["decode"].gm(*a)),
                      generator.layout, ids)
        return (steps if task_ids is None else Routed(steps, task_ids)), generator, ""
    else:   # generate fell back: its last note says why
        why = generator.notes[-1] if generator.mode == "recompute" else "generate built no KV-cache graphs"
    steps = Recompute(compiled.module, ids)
    return (steps if task_ids is None else Routed(steps, task_ids)), generator, why


def eager_steps(model, ids: torch.Tensor, layout, cache_arg: str, keep_logits: bool) -> Steps:
    """The base model's own forward over the same cache inputs (what the graphs are captured from)."""
    from surgeon.generate import _with_cache

    prefill, decode = _with_cache(model, cache_arg, keep_logits), _with_cache(model, cache_arg, False)
    return Steps(prefill, decode, layout, ids)


def kind_row(model, ids: torch.Tensor, name: str, dims: list[tuple[int, int]], log=print) -> tuple[dict, object]:
    """(its row, its steps or None where it failed: the row says why) for one kind."""
    from surgeon.adapters import kinds

    setup = SETUPS.get(name, Setup(PROJECTIONS))
    options = {**setup.options, **fitted_options(kinds()[name], dims)}
    row = {"kind": name, "sites": setup.sites, "options": ", ".join(f"{k}={v}" for k, v in options.items())}
    log(f"  {name} ({row['options'] or 'defaults'}) ...", flush=True)
    adapter = {"name": "a", "type": name, "targets": list(setup.targets), **options}
    stage = "compile"
    try:
        compiled, row["params"] = compile_noisy(model, ids, [adapter], setup.before)
        stage = "generate with it"
        steps, _, row["recompute"] = generation_steps(compiled, ids, setup.task_ids)
        stage = "run"
        with torch.no_grad():
            logits = steps.prefill()
            steps.decode()
        if not bool(torch.isfinite(logits).all()):
            row["note"] = "non-finite logits"
    except Exception as error:  # noqa: BLE001 - the row says why, the other kinds still run
        row["error"] = f"failed to {stage}: {first_line(error)}"
        return row, None
    return row, steps


def prepare(model, ids: torch.Tensor, names: list[str], log=print) -> tuple[dict, list[dict]]:
    """({variant: steps}, rows): the eager base, (no adapter) and every kind that compiles and runs;
    rows in order, a failed kind's with its error."""
    dims = site_dims(model)
    graphs_only, generator, why = generation_steps(compile_noisy(model, ids, [])[0], ids)
    if why:
        raise RuntimeError(f"the model with no adapter does not generate over a KV cache: {why}")
    base = eager_steps(model, ids, generator.layout, generator.cache_arg, generator.keep_logits)
    variants = {BASE: base, NONE: graphs_only}
    rows = [{"kind": name, "sites": "", "params": 0, "options": ""} for name in (BASE, NONE)]
    for name in names:
        row, steps = kind_row(model, ids, name, dims, log)
        rows.append(row)
        if steps is not None:
            variants[name] = steps
    return variants, rows


def base_ms(steps: Steps, calls: int = 5) -> tuple[float, float]:
    """The eager base's median decode and prefill times in milliseconds."""
    def median_ms(fn):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    with torch.no_grad():
        return median_ms(steps.decode), median_ms(steps.prefill)


def measure(variants: dict[str, Steps], rounds: int) -> tuple[dict, dict]:
    """({variant: decode ratio}, {variant: prefill ratio}): medians over interleaved rounds."""
    for steps in variants.values():      # every cache holds its prompt before a decode is timed
        with torch.no_grad():
            steps.prefill()
    decode = interleaved({k: s.decode for k, s in variants.items()}, rounds, DECODE_CALLS, baseline=BASE)
    prefill = interleaved({k: s.prefill for k, s in variants.items()}, rounds, PREFILL_CALLS, baseline=BASE)
    return decode, prefill


def table(rows: list[dict], decode: dict, prefill: dict) -> list[str]:
    """Markdown lines: kind | sites | decode ratio | prefill ratio | trainable params | options set; then why
    each recompute row recomputes."""
    lines = ["| kind | sites | decode ratio | prefill ratio | trainable params | options set |",
             "| --- | --- | --- | --- | --- | --- |"]
    recomputed = []
    for row in rows:
        name, params = row["kind"], f"{row['params']:,}" if "params" in row else ""
        if "error" in row:
            lines.append(f"| {name} | {row['sites']} | {row['error'].replace('|', '/')} | | {params} | "
                         f"{row['options']} |")
            continue
        note = f" ({row['note']})" if row.get("note") else ""
        path = " (recompute: prompt + 1)" if row.get("recompute") else ""
        recomputed += [f"- {name}: {row['recompute'].replace('|', '/')}"] if row.get("recompute") else []
        lines.append(f"| {name} | {row['sites']} | {decode[name]:.2f}x{path} | {prefill[name]:.2f}x{note} | "
                     f"{params} | {row['options']} |")
    if recomputed:
        lines += ["", "recompute: generate runs the compiled module on the whole sequence for each new token (no "
                  "KV cache); its decode is that step on prompt + 1 tokens, against the eager base's cached "
                  "decode step:", *recomputed]
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_kind_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", help="these kinds only (default: every kind of kinds())")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int,
                        help="default: 8/3 hidden rounded up to a multiple of 32 (1376 for hidden 512), as LLaMA")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (the prefill's length)")
    parser.add_argument("--out", help="also write the table to this file (markdown)")
    ns = parser.parse_args(argv)
    if ns.intermediate is None:
        ns.intermediate = math.ceil(8 * ns.hidden / 3 / 32) * 32
    return ns


def header(ns: argparse.Namespace) -> list[str]:
    where = f"CPU ({platform.processor() or platform.machine()}), {ns.threads} thread{'s' * (ns.threads > 1)}"
    return [f"{where}, torch {torch.__version__}, fp32; LLaMA-shaped: {ns.layers} layers, hidden {ns.hidden}, "
            f"intermediate {ns.intermediate}, {ns.heads}/{ns.kv_heads} heads, vocab {ns.vocab}; each kind unmerged "
            "on its sites (the sites column)",
            f"decode: 1 token after a {ns.prompt}-token prompt (KV cache, or recompute where the row says); "
            f"prefill: 1 x {ns.prompt}; median over {ns.rounds} interleaved rounds of time / the eager base's"]


def load() -> str:
    """The machine's load average (1, 5, 15 minutes)."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    from surgeon.adapters import kinds

    ns = parse(argv)
    found = kinds()
    unknown = sorted(set(ns.kinds or ()) - set(found))
    if unknown:
        raise SystemExit(f"bench_kind_overhead: unknown kind(s) {', '.join(unknown)} (kinds: {', '.join(found)})")
    asked = [name for name in found if ns.kinds is None or name in ns.kinds]
    skipped = {name: skip_reason(found[name]) for name in asked if skip_reason(found[name])}
    model = build(ns.layers, ns.hidden, ns.intermediate, ns.heads, ns.kv_heads, ns.vocab)
    ids = torch.randint(3, ns.vocab, (1, ns.prompt), generator=torch.Generator().manual_seed(0))
    print("\n".join(header(ns)), flush=True)
    before = load()
    threads = torch.get_num_threads()
    torch.set_num_threads(ns.threads)
    try:
        variants, rows = prepare(model, ids, [n for n in asked if n not in skipped])
        print(f"measuring {len(variants)} variants ...", flush=True)
        decode, prefill = measure(variants, ns.rounds)
        decode_ms, prefill_ms = base_ms(variants[BASE])
    finally:
        torch.set_num_threads(threads)     # a caller's setting (a test run) is left as it was
    lines = [f"load average (1, 5, 15 min): {before} before, {load()} after",
             f"eager base: decode {decode_ms:.2f} ms, prefill {prefill_ms:.2f} ms", ""] + table(rows, decode, prefill)
    kept = [f"- {name}: {why}" for name, why in DEFAULT_RANK.items() if name in asked and name not in skipped]
    lines += ["", "default rank kept:", *kept] if kept else []
    lines += ["", "skipped:", *(f"- {name}: {why}" for name, why in skipped.items())] if skipped else []
    print("\n".join(lines), flush=True)
    if ns.out:
        Path(ns.out).write_text("\n".join(header(ns) + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
