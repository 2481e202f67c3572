"""Graph passes, one per file, each named as it is named in a spec (`merge` <-> merge.py).

`passes()` is the table of pass classes by spec name: explicit, nothing registers itself at import.
A pass may import the core (surgeon.graph, .pipeline, .rules, .adapters, .groups, .kernels), never
surgeon.compiled or surgeon.cli."""
from __future__ import annotations


def passes() -> dict[str, type]:
    """Pass classes by their spec name."""
    from . import (activate, co_permute, combine, fold_bn, fuse, insert, lower, merge, mosa_merge, permute_nm,
               quantize_adapters, remove, reparameterize, un_permute, unmerge)

    return {cls.name: cls for cls in (insert.Insert, merge.Merge, unmerge.Unmerge, remove.Remove, activate.Activate,
                                      fold_bn.FoldBn, reparameterize.Reparameterize,
                                      combine.Combine, quantize_adapters.QuantizeAdapters, fuse.Fuse, lower.Lower,
                                      co_permute.CoPermute, un_permute.UnPermute, permute_nm.PermuteNm,
                                      mosa_merge.MosaMerge)}
