"""Writing output files without following symlinks (DESIGN.md, "Hostile input").

A folder the user names may itself be a link; the files and folders surgeon creates inside it
are never written through one: a symlink at such a name is replaced (the link is removed and a
plain file or folder made in its place; its target is never opened).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import SurgeonError


def write_text_nofollow(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path`, replacing a symlink there rather than writing through it."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o644), "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def real_dir(path: str | Path) -> Path:
    """`path` as a real folder inside an existing one: made when missing, a symlink there replaced."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    path.mkdir(exist_ok=True)
    return path


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """An output folder must be a folder (or not exist yet); checked before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SurgeonError(f"{option} '{path}' is a file, not a folder; name a folder for the artifacts")
    return path


def check_out_file(path: str | Path, option: str) -> Path:
    """An output file's folder must exist (it is not created) and the name must not be a folder."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SurgeonError(f"{option} '{path}': the folder '{path.parent}' does not exist")
    if path.is_dir() and not path.is_symlink():
        raise SurgeonError(f"{option} '{path}' is a folder; name a file")
    return path
