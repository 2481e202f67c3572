"""The table of passes by spec name (explicit; nothing registers itself at import)."""
from __future__ import annotations


def passes() -> dict[str, type]:
    """Pass classes by their spec name."""
    from .passes import activate, fold_bn, fuse, insert, lower, merge, remove, reparameterize, unmerge

    return {cls.name: cls for cls in (insert.Insert, merge.Merge, unmerge.Unmerge, remove.Remove, activate.Activate,
                                      fold_bn.FoldBn, reparameterize.Reparameterize, fuse.Fuse, lower.Lower)}
