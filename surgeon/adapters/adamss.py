"""AdaMSS (PEFT's `adamss`, Adaptive Multi-Subspaces): low-rank updates inside clustered subspaces of W's SVD.

With W_a the site's out x in weight, plus the bias as one more column where the layer has one (the
input then gains a constant 1: W_a [x; 1] = W x + b), a rank-R randomized SVD W_a ~ U S V^T
(torch.svd_lowrank, niter 2, seeded with `seed`: PEFT's random_seed; R = min(`rank`, out, in + 1)) gives
the frozen basis P = V^T (R x in_a, `adamss_basis`, PEFT's adamss_newB). The out rows of U are
clustered into K = min(`num_subspaces`, out) subspaces; subspace i owns output rows I_i and trains
A_i (r_i x R) and B_i (|I_i| x r_i), r_i = max(1, min(|I_i|, `subspace_rank`)):

    y = W x + b + D [x; 1],   D[I_i] = B_i A_i P   (rows outside every I_i: none; the I_i partition out)

Init (PEFT's): A_i = Q^T from the QR of U_i^T E_i, E_i the top r_i eigenvectors of U_i U_i^T (a
randomized SVD, as PEFT's, seeded from the spec's generator), U_i = U's rows I_i; B_i = 0 (PEFT's
init_weights="orthogonal"), so D = 0 and insertion is the identity bit for bit; `init: random` draws
B_i ~ N(0, 0.01²) (init_weights=None) and changes the function.

The clustering is k-means on U's rows, run once at insertion (`site_options`) and kept as the site
options `subspaces` (each subspace's output rows, ascending, subspaces in label order, as PEFT orders
them) and `ranks`; PEFT's uses scikit-learn's KMeans (init "random", one start, 10 iterations, a
fixed random_state), which `clustering: sklearn` calls the same way (scikit-learn is then needed, and
only then). The default, `clustering: kmeans`, is surgeon's own seeded Lloyd's k-means on the same
rows: the same method, not the same clusters, so an adapter made with it is refused by PEFT export.
A PEFT checkpoint does not hold the clusters (PEFT reclusters when it loads), so its import clusters
with scikit-learn and checks the subspace sizes against the checkpoint's B_i.

Parameters: `adamss_A` (the A_i stacked, sum r_i x R), `adamss_B` (the B_i flattened one after the
other, sum |I_i| r_i), the frozen basis and `adamss_rows` (the I_i concatenated: PEFT's scatter_index,
frozen, rebuilt from `subspaces` where a checkpoint lacks it). A site trains sum r_i (R + |I_i|).

Forward: h = A (P [x; 1]) (one GEMM each), then per subspace B_i h_i, concatenated and index_add-ed
into y at `adamss_rows`. Merge identity: W x + b + D [x; 1] == (W + D[:, :in]) x + (b + D[:, in]); the
weight gets D's first in columns (exact, merge_dtype), the bias its last column (bias_map); unmerge
subtracts both (D does not depend on W).

Not supported: PEFT's ASA (use_asa: pruning subspaces during training by gradient importance; an
imported checkpoint runs all its subspaces, as PEFT's forward does) and use_dynamic_rank for a fresh
adapter (its ranks come from a further randomized SVD; an imported one keeps the ranks it has).
"""
from __future__ import annotations

import torch

from ..graph import get_tensor
from ..rules import Pattern
from . import AdapterKind, Option, aten, merge_dtype

KMEANS_STEPS = 10   # PEFT's max_iter


def basis_rank(opts: dict, fan_in: int, fan_out: int) -> int:
    """R = min(rank, out, in + 1 with a bias column)."""
    return min(opts["rank"], fan_out, fan_in + int(bool(opts.get("biased"))))


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[W, b] in float32 (W alone without a bias), out x in_a."""
    weight = weight.detach().float()
    return weight if bias is None else torch.cat([weight, bias.detach().float().reshape(-1, 1)], dim=1)


def svd_basis(weight_a: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U: out x R, P = V^T: R x in_a) of PEFT's seeded torch.svd_lowrank; the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(weight_a, q=rank, niter=2, M=None)
    return U[:, :rank], V[:, :rank].T


def kmeans(rows: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Labels of Lloyd's k-means on `rows`: `count` distinct rows drawn from `seed` start, 10 steps; an
    emptied cluster takes the row farthest from its centre (so no label is left unused)."""
    gen = torch.Generator().manual_seed(seed)
    rows = rows.double()
    centres = rows[torch.randperm(rows.shape[0], generator=gen)[:count]].clone()
    labels = torch.cdist(rows, centres).argmin(1)
    for _ in range(KMEANS_STEPS):
        for k in range(count):
            members = rows[labels == k]
            if members.numel():
                centres[k] = members.mean(0)
            else:
                far = (rows - centres[labels]).norm(dim=1).argmax()
                centres[k], labels[far] = rows[far], k
        new = torch.cdist(rows, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def sklearn_kmeans(rows: torch.Tensor, count: int) -> torch.Tensor:
    """PEFT's clustering: scikit-learn's KMeans with PEFT's arguments on float32 rows."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as error:
        raise ValueError("adamss: clustering 'sklearn' (PEFT's, which a PEFT checkpoint's import needs: PEFT does "
                         "not save the clusters) needs scikit-learn; install it, or use clustering 'kmeans' for a "
                         "new adapter") from error
    model = KMeans(n_clusters=count, init="random", n_init=1, max_iter=KMEANS_STEPS, random_state=123456789)
    return torch.as_tensor(model.fit_predict(rows.detach().cpu().numpy().astype("float32"))).long()


def subspaces_of(weight: torch.Tensor, bias: torch.Tensor | None, opts: dict) -> list[list[int]]:
    """Each subspace's output rows (ascending; subspaces in label order, as PEFT's seg_locations)."""
    weight_a = _augmented(weight, bias)
    U, _ = svd_basis(weight_a, min(opts["rank"], *weight_a.shape), opts["seed"])
    count = min(opts["num_subspaces"], U.shape[0])
    labels = sklearn_kmeans(U, count) if opts["clustering"] == "sklearn" else kmeans(U, count, opts["seed"])
    return [torch.nonzero(labels == k).flatten().tolist() for k in range(int(labels.max()) + 1)]


def ranks_of(subspaces: list[list[int]], subspace_rank: int) -> list[int]:
    """PEFT's fixed ranks: max(1, min(|I_i|, subspace_rank))."""
    return [max(1, min(len(rows), subspace_rank)) for rows in subspaces]


def _site_call(gm, path, weight_target):
    pattern = Pattern(("linear", "addmm"), path)
    return next((m for ref in gm.graph.find_nodes(op="get_attr", target=weight_target) for u in ref.users
                 if (m := pattern.match(u)) is not None), None)


def _site_options(gm, path, weight_target, opts):
    """`biased` from the graph, and the clustering (`subspaces`, `ranks`, `sizes`) unless the adapter brings it."""
    call = _site_call(gm, path, weight_target)
    if call is None:
        raise ValueError(f"adamss: '{path}' is no linear or Conv1D site")
    found = {"biased": call["bias"] is not None}
    if opts.get("subspaces") is not None:
        return found
    if opts.get("dynamic_rank") and opts.get("ranks") is None:
        raise ValueError("adamss: dynamic_rank (PEFT's use_dynamic_rank) picks ranks from a randomized SVD of each "
                         "subspace, which surgeon does not reproduce for a new adapter (an imported one keeps its "
                         "ranks)")
    weight = get_tensor(gm, weight_target)
    if weight.is_meta:
        raise ValueError(f"adamss: clustering '{path}' needs the base weight's values, which a structure-only "
                         "graph has not")
    weight = weight.t() if call.op == "addmm" else weight
    bias = get_tensor(gm, call["bias"].target) if found["biased"] else None
    subspaces = subspaces_of(weight, bias, {**opts, **found})
    sizes, found_sizes = opts.get("sizes"), [len(rows) for rows in subspaces]
    if sizes is not None and sizes != found_sizes:
        raise ValueError(f"adamss: the base weight of '{path}' clusters into subspaces of {found_sizes} rows, but the "
                         f"checkpoint's B matrices have {sizes}: PEFT saved it on another base weight or another "
                         "scikit-learn")
    ranks = opts.get("ranks") or ranks_of(subspaces, opts["subspace_rank"])
    return {**found, "subspaces": subspaces, "ranks": ranks, "sizes": found_sizes,
            **({"bias_values": bias.detach().float().tolist()} if bias is not None else {})}


def _init(opts, in_features, out_features, dtype, gen, weight):
    subspaces, ranks = opts.get("subspaces"), opts.get("ranks")
    if subspaces is None or ranks is None:
        raise ValueError("adamss: the clusters of the output rows (site options subspaces, ranks) are made from the "
                         "base weight when the adapter is inserted into a model (PEFT's checkpoints do not hold them); "
                         "insert it and merge there")
    rank = basis_rank(opts, in_features, out_features)
    rows = torch.tensor([r for members in subspaces for r in members], dtype=torch.long)
    B_size = sum(len(members) * r for members, r in zip(subspaces, ranks))
    if weight.is_meta:   # a loaded adapter's shape check: shapes only
        return {"adamss_basis": torch.empty(rank, in_features + int(opts["biased"]), device="meta", dtype=dtype),
                "adamss_A": torch.empty(sum(ranks), rank, device="meta", dtype=dtype),
                "adamss_B": torch.empty(B_size, device="meta", dtype=dtype), "adamss_rows": rows}
    # init sees no bias tensor: site_options hands its values over (`bias_values`) where it clustered; a loaded
    # adapter (which brings its basis and factors and takes only `adamss_rows` from here) may lack them
    bias = torch.tensor(opts.get("bias_values") or [0.0] * out_features) if opts["biased"] else None
    U, basis = svd_basis(_augmented(weight, bias), rank, opts["seed"])
    A, B = [], []
    with torch.random.fork_rng(devices=[]):   # PEFT draws these from the global RNG: a seed from the spec's
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
        for members, r in zip(subspaces, ranks):
            U_i = U[members]
            gram_vectors = torch.svd_lowrank(U_i @ U_i.T, q=min(len(members), r), niter=2)[0][:, :r]
            A.append(torch.linalg.qr(U_i.T @ gram_vectors, mode="reduced")[0].T)
            B.append(torch.randn(len(members), r) * 0.01 if opts["init"] == "random" else torch.zeros(len(members), r))
    return {"adamss_basis": basis.to(dtype), "adamss_A": torch.cat(A).to(dtype),
            "adamss_B": torch.cat([b.flatten() for b in B]).to(dtype), "adamss_rows": rows}


def _forward(branch, x, y, params, opts):
    # h = A (P [x; 1]): the basis' last column is the constant input's weight (a bias of the projection)
    basis, in_features = params["adamss_basis"], branch.in_features
    if opts["biased"]:
        weights = branch.op(aten.slice.Tensor, basis, 1, 0, in_features)
        projected = branch.op(aten.linear.default, x, weights, branch.op(aten.select.int, basis, 1, in_features))
    else:
        projected = branch.linear(x, basis)
    h = branch.linear(projected, params["adamss_A"])
    chunks, row, flat = [], 0, 0
    for members, r in zip(opts["subspaces"], opts["ranks"]):   # B_i h_i, for output rows I_i
        h_i = branch.op(aten.slice.Tensor, h, -1, row, row + r)
        B_i = branch.op(aten.view.default, branch.op(aten.slice.Tensor, params["adamss_B"], 0, flat,
                                                     flat + len(members) * r), [len(members), r])
        chunks.append(branch.linear(h_i, B_i))
        row, flat = row + r, flat + len(members) * r
    update = branch.op(aten.cat.default, chunks, -1)
    return branch.op(aten.index_add.default, y, -1, params["adamss_rows"], update)


def full_delta(params: dict, opts: dict, dtype: torch.dtype, device) -> torch.Tensor:
    """D (out x in_a): D[I_i] = B_i A_i P, in `dtype`."""
    basis, A, B = (params[name].to(device=device, dtype=dtype) for name in ("adamss_basis", "adamss_A", "adamss_B"))
    rows = params["adamss_rows"].to(device)
    blocks, row, flat = [], 0, 0
    for members, r in zip(opts["subspaces"], opts["ranks"]):
        blocks.append(B[flat:flat + len(members) * r].view(len(members), r) @ A[row:row + r])
        row, flat = row + r, flat + len(members) * r
    delta = torch.zeros(rows.numel(), basis.shape[1], dtype=dtype, device=device)
    delta[rows] = torch.cat(blocks) @ basis
    return delta


def _delta(params, opts, weight):
    """D's first in columns in merge_dtype(weight) (D does not depend on the weight)."""
    return full_delta(params, opts, merge_dtype(weight), weight.device)[:, :weight.shape[1]]


def _bias_map(params, opts, bias, undo):
    """b + D[:, in] (undo: b' - D[:, in]), float64; None on a layer without the bias column."""
    if not opts["biased"]:
        return None
    column = full_delta(params, opts, torch.float64, bias.device)[:, -1].reshape(bias.shape)
    return bias - column if undo else bias + column


def _merge_refusal(opts):
    if opts.get("biased") is None:
        return ("it is not known whether the adapter's layers have a bias (its basis then has a bias column, whose "
                "update goes into the bias); insert it into the model and merge there")
    return ""


def _param_count(opts, fan_in, fan_out):
    """sum r_i (R + |I_i|), from the site's clusters (set at insertion)."""
    rank = basis_rank(opts, fan_in, fan_out)
    return sum(r * (rank + len(members)) for members, r in zip(opts["subspaces"], opts["ranks"]))


ADAMSS = AdapterKind(
    name="adamss",
    options={"rank": Option(int, 100, positive=True),                 # R, PEFT's r
             "num_subspaces": Option(int, 5, positive=True),         # K
             "subspace_rank": Option(int, 1, positive=True),         # r_i's bound
             "seed": Option(int, 0),                                 # PEFT's random_seed (SVD; surgeon's k-means)
             "clustering": Option(str, "kmeans", choices=("kmeans", "sklearn")),
             "init": Option(str, "default", choices=("default", "random")),
             "dynamic_rank": Option(bool, False),                    # PEFT's use_dynamic_rank: imports only
             # per site, set at insertion (or by an import): the clusters, their ranks and sizes, and the bias
             "subspaces": Option(list, None), "ranks": Option(list, None), "sizes": Option(list, None),
             "biased": Option(bool, None)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    bias_map=_bias_map,
    param_count=_param_count,
    frozen=frozenset({"adamss_basis", "adamss_rows"}),
    recomputed=frozenset({"adamss_rows"}),   # PEFT saves no scatter index: rebuilt from `subspaces`
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    merge_refusal=_merge_refusal,
    site_options=_site_options,
    rank_limit=lambda opts, fan_in, fan_out: None,   # R is clamped to min(r, out, in + 1), as PEFT does
)
