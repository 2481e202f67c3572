"""The generated fused LoRA kernel vs eager vs torch.compile vs the base GEMM (see kernels/bench.py).

    python benchmarks/bench_lora_kernel.py     # needs a CUDA GPU; on a CPU it says so and exits 0
"""
import sys

from surgeon.kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
