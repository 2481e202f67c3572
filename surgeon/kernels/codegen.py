"""Load generated kernel source as a real module file, so Triton (and a reader) can see it.

Triton's JIT reads a kernel's source with `inspect`, so generated code is written to a file
under the kernel cache folder and imported from there: $SURGEON_KERNEL_CACHE, else
$XDG_CACHE_HOME/surgeon/kernels (~/.cache/surgeon/kernels). Since its files run as code, the
folder must be private to the user (see `cache_dir`). Modules are cached per (source, interpreter flag): `@triton.jit`
builds an interpreted function when TRITON_INTERPRET=1 is set at decoration time, so the same
source loaded under the other mode is a different module.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

from ..errors import KernelError

_MODULES: dict[tuple[str, bool], ModuleType] = {}


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cache_dir() -> Path:
    """The folder generated kernel files are written to and imported from.

    It is created with mode 0700. One that another user owns, or that group or others may write
    to, is refused (KernelError): a file planted there would be imported as a kernel.
    """
    override = os.environ.get("SURGEON_KERNEL_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(override) if override else base / "surgeon" / "kernels"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(path)
    return path


def _check_private(path: Path) -> None:
    if not hasattr(os, "getuid"):
        return
    info = path.stat()
    if info.st_uid != os.getuid():
        raise KernelError(f"kernel cache folder '{path}' belongs to user id {info.st_uid}, not to you "
                          f"({os.getuid()}); its files would run as code. Set SURGEON_KERNEL_CACHE to a folder of "
                          "your own")
    if info.st_mode & 0o022:
        raise KernelError(f"kernel cache folder '{path}' is writable by others (mode {info.st_mode & 0o777:o}); its "
                          f"files would run as code. Run `chmod 700 {path}`, or set SURGEON_KERNEL_CACHE to a private "
                          "folder")


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
