"""Golden snapshots of generated kernel source (tests/kernels/golden/)."""
from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def assert_matches_golden(text: str, name: str) -> None:
    """`text` equals golden/`name` (rewritten instead with SURGEON_UPDATE_GOLDEN=1) and is valid Python."""
    golden = GOLDEN / name
    if os.environ.get("SURGEON_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "generated source changed; rerun with SURGEON_UPDATE_GOLDEN=1 if intended"
    compile(text, str(golden), "exec")
