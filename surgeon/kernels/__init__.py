"""Generated Triton kernels for fused regions: templates and codegen, launchers, tuning.

codegen.py loads generated source from the private kernel cache; lora_linear*.py, bottleneck.py
and pointwise*.py are the region kinds (source templates, launchers with a torch reference each,
registered as torch custom ops in registry.py); epilogue.py and program_epilogue.py are the per-op
epilogue rules; dispatch.py and tuning.py choose a strategy per shape bucket. The package may import
torch, triton (lazily: machines without it run the references), surgeon.errors and the graph
helpers; the `lower` pass builds on it. Benchmarks of these kernels live in surgeon.bench.
"""
