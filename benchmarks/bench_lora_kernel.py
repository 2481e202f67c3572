"""The fused LoRA linear and the lowered LoRA SwiGLU MLP vs eager, torch.compile and base GEMMs (see kernels/bench.py).

    python benchmarks/bench_lora_kernel.py [--json out.json] [--budget 130]   # needs a CUDA GPU; on a CPU it
                                                                               # says so and exits 0
"""
import sys

from surgeon.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
