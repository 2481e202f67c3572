"""Benchmarks: the measuring harness and the tables `surgeon bench` prints.

- harness.py  interleaved rounds and median ratios, GPU timers, table printing, JSON;
- models.py   the whole-model table: LoRA overhead vs the eager base model, surgeon vs PEFT;
- kernels.py  the generated LoRA linear and a lowered LoRA SwiGLU MLP vs eager, torch.compile, base GEMMs;
- family.py   the other lowered regions (DoRA, IA3, bottleneck, RMSNorm, GELU program, LoHa).
- kind_setups.py  where benchmarks/bench_kind_overhead.py puts each adapter kind, with what options.

The command line is surgeon.cli.bench; benchmarks/ holds standalone scripts and pytest-benchmark
suites built on these. This package may import the core, surgeon.kernels and (lazily) transformers
and peft; nothing in the core imports it.
"""
