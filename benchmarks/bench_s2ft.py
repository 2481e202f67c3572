"""One training step: S2FT dense-slice update vs LoRA r=16 vs full fine-tuning (prints; not a test).

Model: surgeon.models.TinyLlama with 4 layers (hidden 256, 8 query / 4 key-value heads of 32,
SwiGLU intermediate 688, vocab 1024), fp32, batch 4 x 128 tokens, next-token cross entropy,
AdamW. A step is forward + loss + backward + optimizer step + zero_grad.

- s2ft: co-permute {ffn_fraction: F, head_fraction: F} moves the selected FFN channels and attention
  heads (whole key/value groups) to the front; then each o_proj / down_proj linear is split as
  y = x[..., :k] W[:, :k]^T + x[..., k:] W[:, k:]^T with only W[:, :k] a trainable parameter, so the
  weight gradient is computed for the selected slice only (what S2FT trains: the output-side
  columns of the selected heads and channels); everything else is frozen.
- lora: surgeon insert, LoRA r=16 (alpha 32) on q,k,v,o,gate,up,down; base frozen.
- full: every parameter trainable.

Time: all variants in one process, round-robin (the order rotates each round), median per step.
Memory: peak resident-set increase over the resident set just before the first step, sampled
every 0.5 ms during 3 steps, each variant in a fresh subprocess (freed memory is not returned
to the OS, so variants cannot share a process for this figure).

    python benchmarks/bench_s2ft.py [--rounds 8] [--fraction 0.25] [--threads 1]

One thread by default: on a shared, loaded CPU, intra-op threads spin-wait on each other and the
step time then measures the load, not the method.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

VOCAB, BATCH, SEQ = 1024, 4, 128
TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def build():
    from surgeon.models import tiny_llama

    model, _ = tiny_llama(seed=0, vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_layers=4,
                          num_heads=8, num_kv_heads=4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return model, ids


def slice_linears(gm, made_by: str = "bench-s2ft") -> int:
    """Split each consumer linear of a co-permuted group into a trainable leading slice and a frozen rest."""
    from surgeon.graph import call, get_attr, get_tensor, lint, set_parameter

    aten = torch.ops.aten
    slices = {}
    for e in gm.meta["surgeon_permutations"][-1]["groups"]:
        for m in e["members"]:
            if m["role"] == "in" and m["axis"] == 1:
                slices[m["tensor"]] = len(e["selected"]) * e["unit"]
    for node in list(gm.graph.nodes):
        if node.target is not aten.linear.default or node.args[1].target not in slices:
            continue
        target, x = node.args[1].target, node.args[0]
        k, weight, path = slices[target], get_tensor(gm, target).detach(), node.meta["surgeon_path"]
        set_parameter(gm, f"{path}.s2ft_slice", weight[:, :k].clone(), requires_grad=True)
        set_parameter(gm, f"{path}.s2ft_rest", weight[:, k:].clone(), requires_grad=False)
        with gm.graph.inserting_before(node):
            kw = dict(made_by=made_by, path=path)
            head = call(gm.graph, aten.slice.Tensor, (x, -1, 0, k), **kw)
            rest = call(gm.graph, aten.slice.Tensor, (x, -1, k, weight.shape[1]), **kw)
            w_head = get_attr(gm.graph, f"{path}.s2ft_slice", made_by=made_by)
            w_rest = get_attr(gm.graph, f"{path}.s2ft_rest", made_by=made_by)
            y_head = call(gm.graph, aten.linear.default, (head, w_head), **kw)
            y_rest = call(gm.graph, aten.linear.default, (rest, w_rest), **kw)
            y = call(gm.graph, aten.add.Tensor, (y_head, y_rest), **kw)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    lint(gm)
    return len(slices)


def variant(name: str, model, ids, fraction: float):
    """(module, trainable parameters, note) for one variant."""
    import surgeon

    if name == "full":
        module = surgeon.compile(model, (ids,), {"adapters": []}).module
        for p in module.parameters():
            p.requires_grad_(True)
        return module, "all parameters"
    if name == "lora":
        spec = {"adapters": [{"name": "a", "type": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}]}
        return surgeon.compile(model, (ids,), spec).module, "r=16 on 7 projections x 4 layers"
    spec = {"adapters": [], "pipeline": [{"co-permute": {"ffn_fraction": fraction, "head_fraction": fraction}}]}
    compiled = surgeon.compile(model, (ids,), spec)
    module = compiled.module
    for p in module.parameters():
        p.requires_grad_(False)
    sliced = slice_linears(module)
    with torch.no_grad():
        torch.testing.assert_close(module(ids), model(ids))          # the split is the same function
    notes = [n for n in compiled.report.rows[-1].notes if "layers.0." in n]
    return module, f"{sliced} sliced linears; " + "; ".join(notes)


def step_fn(module, ids):
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    targets = torch.roll(ids, -1, dims=1)

    def step():
        logits = module(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in trainable)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(name: str, fraction: float, steps: int = 3) -> float:
    """Peak RSS increase (MiB) over the RSS before the first step, sampled during `steps` steps."""
    model, ids = build()
    module, _ = variant(name, model, ids, fraction)
    step, _ = step_fn(module, ids)
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)
    thread = threading.Thread(target=sample)
    thread.start()
    for _ in range(steps):
        step()
    done.set()
    thread.join()
    return (max(peak[0], _rss()) - base) / 2**20


def interleaved_times(names: list[str], model, ids, ns) -> tuple[dict, dict]:
    """Seconds per step of each variant over ns.rounds round-robin rounds (order rotating)."""
    runs, info = {}, {}
    for name in names:
        module, note = variant(name, model, ids, ns.fraction)
        runs[name], count = step_fn(module, ids)
        info[name] = (count, note)
        runs[name]()                                   # warm-up (allocates optimizer state)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(ns.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)
    if ns.memory_of:
        print(json.dumps({"mib": peak_memory(ns.memory_of, ns.fraction)}))
        return
    model, ids = build()
    names = ["s2ft", "lora", "full"]
    times, info = interleaved_times(names, model, ids, ns)
    memory = {}
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--memory-of", name, "--fraction", str(ns.fraction),
                              "--threads", str(ns.threads)], capture_output=True, text=True, check=True)
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    total = sum(p.numel() for p in model.parameters())
    print(f"one training step, TinyLlama 4 layers (hidden 256, 8/4 heads, ffn 688, vocab {VOCAB}), fp32, "
          f"batch {BATCH} x {SEQ} tokens, AdamW; CPU {platform.processor() or platform.machine()}, "
          f"{ns.threads} threads, torch {torch.__version__}; {ns.rounds} interleaved rounds, median")
    print(f"s2ft selected fraction: {ns.fraction} of FFN channels and of key/value head groups per layer\n")
    full_time = statistics.median(times["full"])
    print(f"{'variant':8} {'trainable':>12} {'of model':>9} {'ms/step':>9} {'vs full':>8} {'peak RSS +MiB':>14}  note")
    for name in names:
        median = statistics.median(times[name])
        count, note = info[name]
        print(f"{name:8} {count:>12,} {count / total:>8.2%} {median * 1e3:>9.1f} {median / full_time:>7.2f}x "
              f"{memory[name]:>14.1f}  {note}")


if __name__ == "__main__":
    main()
