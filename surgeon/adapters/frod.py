"""FRoD (AAAI 2026): the weight rewritten in a basis V, W' = U (S + Λ) V^T, with a sparse trained S.

V (in x in) is a basis for the input space, built from base weights (below). The base weight W
(out x in) is written in it: B = W V^-T, Λ0 = diag(column norms of B), U = B Λ0^-1 (unit columns),
so W = U Λ0 V^T. A site trains the diagonal λ (in, starting at Λ0's) and the values s of a sparse
in x in matrix S (starting at 0) on nnz fixed off-diagonal positions, and the layer computes
W' = U (S + diag λ) V^T. At init W' = W up to rounding (check "close"); `init: random` (PEFT's
init_weights=False) adds N(0, 0.1^2) noise to λ and s and changes the function.

The basis (PEFT's `_projection_from_weights`, rewritten): for weights W_1..W_k stacked into
X (sum of rows x in), V = the right singular vectors of X when X has fewer rows than columns;
else X = QR, Q's row blocks Q_i, T = mean_i (Q_i^T Q_i + α I)^-1 (α = `regularization`), and
V = R^T E with E the eigenvectors of T. PEFT builds one V per module role (q_proj, down_proj ...)
from that role's weights in every targeted layer; a surgeon-made adapter builds each module's V
from its own weight (PEFT's V when one module has the role). An imported checkpoint carries
PEFT's V and S positions (save_projection=True), which surgeon reads; U is not saved by PEFT
either (it recomputes it from the base weight at load), so surgeon computes it from the frozen
base weight in the graph.

S's positions: with a CPU generator seeded by `projection_seed` (PEFT's projection_prng_key),
nnz = min(int(in^2 * rate), in^2 - in) (at least 1 when rate > 0) entries of a randperm over the
off-diagonal pairs in row-major order. PEFT draws the roles in sorted order from one generator,
so this is PEFT's pattern for the first role; an import reads the saved ones.

Forward: with h = dropout(x), y + U (S + diag λ) V^T h - W h (PEFT's, which in eval is W' x + b).
U is computed exactly as PEFT does (a float64 solve on the CPU, then float32), because U's columns
for W's null space (out < in) are rounding noise scaled to unit length, which a trained λ then
weighs: any other rounding gives another U. It is a graph call (`frod_u`) that computes U on first
use and again only when the base weight or V changes, so a forward costs PEFT's products (V^T h, S,
U) plus W h.

Trained: in + nnz per site (λ and s). Frozen: V (in x in) and the positions (2 x nnz).
Merge: ΔW = W' - W, exact (W' is built from the weight it lands on). Unmerge is refused: the merged
weight W' no longer holds the W that U came from (PEFT keeps a copy of W to unmerge).
Linear and GPT-2 Conv1D sites (PEFT takes both).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from . import AdapterKind, Option, aten, merge_dtype

NORM_FLOOR = 1e-12   # PEFT leaves U's column at zero where Λ0's entry is at most this


def basis(matrices: list[torch.Tensor], regularization: float) -> torch.Tensor:
    """V (in x in) from weights of one role (each rows x in, float32, in layer order)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    eye = torch.eye(dim, dtype=r.dtype)
    total = torch.zeros(dim, dim, dtype=r.dtype)
    start = 0
    for matrix in matrices:
        block = q[start:start + matrix.shape[0]]
        start += matrix.shape[0]
        total += torch.linalg.inv(block.T @ block + regularization * eye)
    total /= len(matrices)
    return r.T @ torch.linalg.eigh(total)[1]


def output_basis(weight: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, Λ0's diagonal), float32, as PEFT computes them: B = W V^-T by a float64 solve on the CPU (a
    singular V takes its pseudo-inverse), Λ0 its column norms, U = B Λ0^-1 with zero columns where a
    norm is <= 1e-12. Done the same way because U's columns for W's null space (out < in) are rounding
    noise scaled to unit length, which a trained λ then weighs: another rounding gives another U."""
    w, v = weight.detach().double().cpu(), v.detach().double().cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    kept = norms > NORM_FLOOR
    u[:, kept] = b[:, kept] / norms[kept]
    return u.float(), norms.float()


_U_CACHE = WeakIdKeyDictionary()   # base weight -> (what it was computed from, U)


def frod_u(weight: torch.Tensor, v: torch.Tensor, transposed: bool) -> torch.Tensor:
    """U (out x in, the weight's dtype and device) for a site's base weight (stored in x out when
    `transposed`: GPT-2's Conv1D). A graph call: PEFT computes U once, when the adapter is made; this
    computes it on first use and again only when the weight or V changes (version counters)."""
    if isinstance(weight, FakeTensor) or weight.device.type == "meta":   # shape propagation only
        return weight.new_empty(weight.shape[::-1] if transposed else weight.shape)
    key = (weight._version, weight.data_ptr(), id(v), v._version, v.data_ptr(), transposed)
    held = _U_CACHE.get(weight)
    if held is None or held[0] != key:
        with torch.no_grad():
            u = output_basis(weight.t() if transposed else weight, v)[0].to(weight.device, weight.dtype)
        held = _U_CACHE[weight] = (key, u)
    return held[1]


def sparse_count(size: int, rate: float) -> int:
    """nnz of S for an in x in matrix, PEFT's rule."""
    off = size * size - size
    count = min(int(size * size * rate), off)
    return max(1, count) if rate > 0 and off > 0 else count


def positions(size: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """2 x nnz (row, column) off-diagonal positions: the first nnz of a randperm over the off-diagonal
    pairs in row-major order, drawn from `generator` (advanced, as PEFT's shared one is)."""
    count = sparse_count(size, rate)
    if not count:
        return torch.empty(2, 0, dtype=torch.long)
    k = torch.randperm(size * size - size, generator=generator)[:count]
    rows = k // (size - 1)
    cols = k % (size - 1)
    return torch.stack([rows, cols + (cols >= rows).long()])


def _init(opts, in_features, out_features, dtype, gen, weight):
    size, rate = in_features, float(opts["sparse_rate"])
    if weight.is_meta:   # shapes only (a structure-only graph, or the loaded-shape check)
        count = sparse_count(size, rate)
        return {"frod_lambda_l": torch.empty(size, dtype=dtype, device="meta"),
                "frod_lambda_s_values": torch.empty(count, dtype=dtype, device="meta"),
                "frod_V": torch.empty(size, size, dtype=dtype, device="meta"),
                "frod_s_indices": torch.empty(2, count, dtype=torch.long, device="meta")}
    v = basis([weight.detach().float().cpu()], float(opts["regularization"]))
    lam = output_basis(weight, v)[1]
    at = positions(size, rate, torch.Generator().manual_seed(opts["projection_seed"]))
    values = torch.zeros(at.shape[1])
    if opts["init"] == "random":
        values = torch.randn(at.shape[1], generator=gen) * 0.1
        lam = lam + torch.randn(size, generator=gen) * 0.1
    return {"frod_lambda_l": lam.to(dtype), "frod_lambda_s_values": values.to(dtype), "frod_V": v.to(dtype),
            "frod_s_indices": at}


def _middle(branch, params, size: int):
    """S + diag(λ) (in x in; graph code, eager on tensors)."""
    s = params["frod_lambda_s_values"]
    dense = branch.op(aten.new_zeros.default, s, [size, size])
    at = params["frod_s_indices"]
    rows, cols = branch.op(aten.select.int, at, 0, 0), branch.op(aten.select.int, at, 0, 1)
    dense = branch.op(aten.index_put.default, dense, [rows, cols], s)
    return branch.add(dense, branch.op(aten.diag_embed.default, params["frod_lambda_l"]))


def _forward(branch, x, y, params, opts):
    h = branch.dropout(x, opts.get("dropout", 0.0))
    u = branch.op(frod_u, branch.weight, params["frod_V"], branch.transposed)
    z = branch.linear(h, branch.op(aten.t.default, params["frod_V"]))            # V^T h
    z = branch.linear(z, _middle(branch, params, branch.in_features))             # (S + diag λ) V^T h
    return branch.op(aten.sub.Tensor, branch.add(y, branch.linear(z, u)), branch.linear(h, branch.base_weight()))


def _delta(params, opts, weight):
    """W' - W = U (S + diag λ) V^T - W in merge_dtype(weight) (U as PEFT's: float32)."""
    dtype = merge_dtype(weight)
    p = {name: t.detach().to(weight.device, dtype if t.is_floating_point() else t.dtype)
         for name, t in params.items()}
    u = output_basis(weight, p["frod_V"])[0].to(weight.device, dtype)
    rows, cols = p["frod_s_indices"]
    middle = torch.diag_embed(p["frod_lambda_l"]).index_put((rows, cols), p["frod_lambda_s_values"], accumulate=True)
    return (u @ middle @ p["frod_V"].T).sub_(weight.detach().to(dtype))


FROD = AdapterKind(
    name="frod",
    options={"sparse_rate": Option(float, 0.01, bounds=(0.0, 1.0)), "projection_seed": Option(int, 0),
             "regularization": Option(float, 1e-3), "init": Option(str, "default", choices=("default", "random")),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: fan_in + sparse_count(fan_in, float(opts["sparse_rate"])),
    refuse_unmerge=("FRoD's merged weight U (S + diag λ) V^T replaces W, and U was computed from that W, which the "
                    "merge does not keep (PEFT unmerges from a saved copy of W)"),
    frozen=frozenset({"frod_V", "frod_s_indices"}),
    init_check=lambda opts: "none" if opts["init"] == "random" else "close",
)


def role(path: str) -> str:
    """PEFT's name for a module's role, which its V and S positions are shared by: the last two path
    parts joined by "_" ("model.layers.3.self_attn.q_proj" -> "self_attn_q_proj"), the last alone
    after a layer number, and BERT's attention "output.dense" told apart as "attention_output"."""
    parts = path.split(".")
    if len(parts) == 1 or parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return f"{parts[-2]}_{parts[-1]}"
