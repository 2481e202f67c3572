"""LoRA overhead vs the eager base model and PEFT; the same as `surgeon bench` (see surgeon/bench.py)."""
import sys

from surgeon.bench import main

if __name__ == "__main__":
    sys.exit(main())
