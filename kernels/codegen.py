"""Load generated kernel source as a real module file, so Triton (and a reader) can see it.

Triton's JIT reads a kernel's source with `inspect`, so generated code is written to a file
under the kernel cache folder ($SURGEON_KERNEL_CACHE, else a per-user folder in the temp dir)
and imported from there. Modules are cached per (source, interpreter flag): `@triton.jit`
builds an interpreted function when TRITON_INTERPRET=1 is set at decoration time, so the same
source loaded under the other mode is a different module.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from types import ModuleType

_MODULES: dict[tuple[str, bool], ModuleType] = {}


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cache_dir() -> Path:
    """The folder generated kernel files are written to."""
    default = Path(tempfile.gettempdir()) / f"surgeon_kernels_{os.getuid() if hasattr(os, 'getuid') else 0}"
    path = Path(os.environ.get("SURGEON_KERNEL_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(source: str, stem: str) -> ModuleType:
    """Import `source` from a file named after `stem` and the source's hash (cached)."""
    key = (source, interpreting())
    if key not in _MODULES:
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        path = cache_dir() / f"{identifier(stem)}_{digest}.py"
        if not path.exists() or path.read_text() != source:
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(source)
            partial.replace(path)   # atomic: a concurrent reader never sees half a file
        spec = importlib.util.spec_from_file_location(f"surgeon_generated.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


def identifier(text: str) -> str:
    """`text` as a Python identifier (dots and other symbols become underscores)."""
    name = re.sub(r"\W", "_", text).strip("_") or "kernel"
    return name if not name[0].isdigit() else f"k_{name}"
