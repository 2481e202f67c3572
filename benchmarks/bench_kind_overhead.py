"""What each adapter kind costs unmerged: decode and prefill against the base model (prints; not a test).

    python benchmarks/bench_kind_overhead.py [--rounds 15] [--threads 2] [--kinds lora dora ...]
        [--layers 4] [--hidden 512] [--prompt 128] [--out kind_overhead.md]

The model: transformers' LlamaForCausalLM from a LlamaConfig with random weights (default 4 layers,
hidden 512, intermediate 1376, 8 heads, 4 key/value heads, vocab 2000), fp32 on the CPU, no grad.
Every kind of surgeon.adapters.kinds() that attaches to linear sites is inserted on all seven
projections (q, k, v, o, gate, up, down) with its default options, except rank 16 where the kind
has a `rank` (less where its rank_limit says a site takes less; not in DEFAULT_RANK) and the shape
options of FITS and AT_MOST (the kind's own checks: the largest value up to its default that fits); its
trainable parameters get seeded noise added, so no branch multiplies by a zero factor. Left out,
each with its reason in the output: `delta`, `s2ft`, `prefix` (SKIPPED) and any kind whose site
ops do not include aten.linear.

What runs is what surgeon's `generate` runs: the compiled module's prefill and one-token decode
graphs (`Compiled.generator`), called directly over a preallocated KV cache of prompt + 1 positions:

  prefill  batch 1, the prompt's tokens, the last position's logits
  decode   one token after the prompt, over the cache that prefill filled (each call writes the
           same cache position, so every call does the same work)

The baseline `eager base` is the untouched transformers model running the forward those graphs are
captured from (surgeon.generate's cache wrapper) on the same inputs; the row `(no adapter)` is
surgeon's graphs with no adapter inserted (the captured graph's own cost, for reading a kind's row
against it). Every variant runs once per round, round-robin; a figure is the median over rounds of
its time / the eager base's in the same round (surgeon.bench.harness.interleaved). A kind that fails
to compile or run gets a row with its error's first line; the others still run.
"""
from __future__ import annotations

import argparse
import math
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
from surgeon.bench.models import TARGETS  # noqa: E402

RANK = 16
DECODE_CALLS, PREFILL_CALLS = 10, 2      # calls per variant per round (a decode step is the shorter)
NOISE = 0.02                              # scale of the seeded noise added to every trainable parameter
BASE, NONE = "eager base", "(no adapter)"

# kinds this table leaves out, with the reason printed
SKIPPED = {
    "delta": "a full dense update per site (in x out parameters, the base weight's size): an intermediate "
             "form of `combine`, merged or re-factorized before use",
    "s2ft": "its columns come from a co-permute record (run `co-permute` first): benchmarks/bench_s2ft.py",
    "prefix": "attaches to the attention call (sdpa), not to linear projections",
}

# the shape options a kind checks against every site (its own checks in surgeon/adapters/<kind>.py):
# option -> the sizes it must divide ("in", "out", "rank": the rank used here) and "even" where it must
# be even; the largest value up to the kind's default that passes on every site is used
FITS = {
    "oft": {"block_size": ("in",)},
    "boft": {"block_size": ("in",)},                 # with butterfly_factor 1, its default
    "c3a": {"block_size": ("in", "out")},
    "road": {"group_size": ("out", "even")},
    "gralora": {"blocks": ("in", "out", "rank")},
    "ether": {"blocks": ("in", "out")},
    "ether_plus": {"blocks": ("in", "out")},
    "vblora": {"vector_length": ("in", "out")},
}
# option -> at most this many on a site of (in, out): the least over the sites, where the default is more
AT_MOST = {"fourierft": {"frequencies": lambda fan_in, fan_out: fan_in * fan_out},
           "waveft": {"frequencies": lambda fan_in, fan_out: fan_in * fan_out}}
# kinds that keep their default rank, and why
DEFAULT_RANK = {"supertuning": "a rank adds a LoRA part (Supra); its default, Super, is measured"}


def build(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, seed: int = 0):
    """The LLaMA-shaped model, random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def site_dims(model) -> list[tuple[int, int]]:
    """(in, out) of every distinct linear site the targets name."""
    from surgeon.rules import path_matches

    return sorted({(m.in_features, m.out_features) for path, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(path_matches(path, t) for t in TARGETS)})


def skip_reason(kind) -> str:
    """Why this table leaves `kind` out, or ""."""
    if kind.name in SKIPPED:
        return SKIPPED[kind.name]
    if "linear" not in kind.site_ops:
        return f"its site ops ({', '.join(kind.site_ops)}) do not include aten.linear"
    return ""


def _fits(value: int, needs: tuple[str, ...], dims: list[tuple[int, int]], rank: int | None) -> bool:
    """Whether `value` divides every size `needs` names on every site (and is even where it says so)."""
    sizes = [fan_in for fan_in, _ in dims] * ("in" in needs) + [fan_out for _, fan_out in dims] * ("out" in needs)
    sizes += [rank] if "rank" in needs and rank else []
    return all(s % value == 0 for s in sizes) and not ("even" in needs and value % 2)


def fitted_options(kind, dims: list[tuple[int, int]]) -> dict:
    """The options set for `kind` on sites of `dims` that differ from its defaults (see FITS, AT_MOST)."""
    defaults = {name: option.default for name, option in kind.options.items()}
    chosen = {"rank": RANK} if "rank" in defaults and kind.name not in DEFAULT_RANK else {}
    if chosen:
        limits = [limit[0] for fan_in, fan_out in dims
                  if (limit := kind.rank_limit({**defaults, **chosen}, fan_in, fan_out)) is not None]
        chosen["rank"] = min([RANK, *limits])
    for option, needs in FITS.get(kind.name, {}).items():
        default = defaults.get(option)
        if isinstance(default, int) and default > 0:
            value = next((v for v in range(default, 0, -1) if _fits(v, needs, dims, chosen.get("rank"))), default)
            chosen[option] = value
    for option, bound in AT_MOST.get(kind.name, {}).items():
        if isinstance(defaults.get(option), int):
            chosen[option] = min([defaults[option], *(bound(fan_in, fan_out) for fan_in, fan_out in dims)])
    return {name: value for name, value in chosen.items() if value != defaults.get(name)}


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


def compile_noisy(model, ids: torch.Tensor, adapters: list[dict]):
    """(Compiled, trainable parameters): `adapters` inserted, their trainable parameters given seeded noise."""
    import surgeon

    spec = {"adapters": adapters, "pipeline": ["insert"] if adapters else []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        compiled = surgeon.compile(model, (ids[:, :8],), spec, {"use_cache": False}, verify=False)
    trainable = [p for p in compiled.module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=gen) * NOISE)
    return compiled, sum(p.numel() for p in trainable)


def graph_steps(compiled, ids: torch.Tensor) -> tuple[Steps, object]:
    """(steps over the compiled module's generation graphs, its generator): built by a short generate, which
    checks them against the compiled module's own forward."""
    with warnings.catch_warnings(record=True):   # a fall back to recompute warns: its note is the error below
        compiled.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
    generator = compiled.generator
    if generator is None or generator.mode != "cache" or not generator.graphs:
        raise RuntimeError(getattr(generator, "notes", ["no generator"])[-1])
    graphs = generator.graphs
    steps = Steps(lambda *a: _logits(graphs["prefill"].gm(*a)), lambda *a: _logits(graphs["decode"].gm(*a)),
                  generator.layout, ids)
    return steps, generator


def eager_steps(model, ids: torch.Tensor, layout, cache_arg: str, keep_logits: bool) -> Steps:
    """The base model's own forward over the same cache inputs (what the graphs are captured from)."""
    from surgeon.generate import _with_cache

    prefill, decode = _with_cache(model, cache_arg, keep_logits), _with_cache(model, cache_arg, False)
    return Steps(prefill, decode, layout, ids)


def prepare(model, ids: torch.Tensor, names: list[str], log=print) -> tuple[dict, list[dict]]:
    """({variant: Steps}, rows): the eager base, (no adapter) and every kind that compiles and runs;
    rows in order, a failed kind's with its error."""
    from surgeon.adapters import kinds

    found, dims = kinds(), site_dims(model)
    graphs_only, generator = graph_steps(compile_noisy(model, ids, [])[0], ids)
    base = eager_steps(model, ids, generator.layout, generator.cache_arg, generator.keep_logits)
    variants = {BASE: base, NONE: graphs_only}
    rows = [{"kind": BASE, "params": 0, "options": ""}, {"kind": NONE, "params": 0, "options": ""}]
    for name in names:
        kind = found[name]
        options = fitted_options(kind, dims)
        row = {"kind": name, "options": ", ".join(f"{k}={v}" for k, v in options.items())}
        rows.append(row)
        log(f"  {name} ({row['options'] or 'defaults'}) ...", flush=True)
        adapter = {"name": "a", "type": name, "targets": TARGETS, **options}
        stage = "compile"
        try:
            compiled, row["params"] = compile_noisy(model, ids, [adapter])
            stage = "build its KV-cache graphs"
            steps, _ = graph_steps(compiled, ids)
            stage = "run"
            with torch.no_grad():
                logits = steps.prefill()
                steps.decode()
            if not bool(torch.isfinite(logits).all()):
                row["note"] = "non-finite logits"
        except Exception as error:  # noqa: BLE001 - the row says why, the other kinds still run
            row["error"] = f"failed to {stage}: {first_line(error)}"
            continue
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
    """Markdown lines: kind | decode ratio | prefill ratio | trainable params | options set."""
    lines = ["| kind | decode ratio | prefill ratio | trainable params | options set |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        name = row["kind"]
        if "error" in row:
            params = f"{row['params']:,}" if "params" in row else ""
            lines.append(f"| {name} | {row['error'].replace('|', '/')} | | {params} | {row['options']} |")
            continue
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {name} | {decode[name]:.2f}x | {prefill[name]:.2f}x{note} | {row['params']:,} | "
                     f"{row['options']} |")
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
            "on all 7 projections",
            f"decode: 1 token after a {ns.prompt}-token prompt (KV cache); prefill: 1 x {ns.prompt}; "
            f"median over {ns.rounds} interleaved rounds of time / the eager base's"]


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
    threads = torch.get_num_threads()
    torch.set_num_threads(ns.threads)
    try:
        variants, rows = prepare(model, ids, [n for n in asked if n not in skipped])
        print(f"measuring {len(variants)} variants ...", flush=True)
        decode, prefill = measure(variants, ns.rounds)
        decode_ms, prefill_ms = base_ms(variants[BASE])
    finally:
        torch.set_num_threads(threads)     # a caller's setting (a test run) is left as it was
    lines = [f"eager base: decode {decode_ms:.2f} ms, prefill {prefill_ms:.2f} ms", ""] + table(rows, decode, prefill)
    kept = [f"- {name}: {why}" for name, why in DEFAULT_RANK.items() if name in asked and name not in skipped]
    lines += ["", "default rank kept:", *kept] if kept else []
    lines += ["", "skipped:", *(f"- {name}: {why}" for name, why in skipped.items())] if skipped else []
    print("\n".join(lines), flush=True)
    if ns.out:
        Path(ns.out).write_text("\n".join(header(ns) + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
