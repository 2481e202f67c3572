"""LoRA overhead vs the eager base model and PEFT; the same as `surgeon bench` (surgeon/bench/models.py, surgeon/cli/bench.py)."""
import sys

from surgeon.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
