"""DoRA, IA3 (input), bottleneck, RMSNorm-tail and GELU-program regions: lowered vs eager vs torch.compile
(see kernels/bench_family.py).

    python benchmarks/bench_family_kernels.py [--json out.json] [--budget 90]   # needs a CUDA GPU; on a CPU
                                                                                 # it says so and exits 0
"""
import sys

from surgeon.bench.family import main

if __name__ == "__main__":
    sys.exit(main())
