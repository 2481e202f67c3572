"""combine method orthomerge: rotations merged in the Lie algebra, other kinds split by Procrustes.

Tolerances: the Lie-algebra math runs in float64 and is checked to float64 rounding (1e-12 on
unit-scale rotations); the combined adapter is stored in the model's dtype (float32), so checks of
the compiled model's tensors use float32 rounding of the weights (atol 1e-7 on weights of size ~0.1)
and logits use the pipeline's "close" check.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from surgeon.passes import _combine_methods as methods
from surgeon.passes.combine import site_delta
from surgeon.pipeline import compare
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits

F64 = torch.float64
Q_PROJ = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]


def skew(n: int, seed: int, norm: float) -> torch.Tensor:
    """A random n x n skew matrix of spectral norm `norm` (its rotation turns by at most `norm`)."""
    a = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    a = a - a.T
    return a * (norm / torch.linalg.matrix_norm(a, 2))


def plane_rotations(angles: torch.Tensor) -> torch.Tensor:
    """blockdiag([[cos a, -sin a], [sin a, cos a]]) for each angle a: commuting 2x2 rotations."""
    return torch.block_diag(*[torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=F64)
                              for a in angles.tolist()])


def identity(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


# ---------------------------------------------------------------- the logarithm and Procrustes, on their own

@pytest.mark.parametrize("n", [2, 3, 16, 64])
@pytest.mark.parametrize("turn", [1e-9, 1e-3, 0.5, 3.0])
def test_rotation_log_inverts_the_exponential(n, turn):
    generator = skew(n, seed=n, norm=turn)                      # turns by at most `turn` < pi: principal
    rotation = torch.linalg.matrix_exp(generator)
    log = methods.rotation_log(rotation)
    torch.testing.assert_close(log, -log.T, rtol=0, atol=0)     # skew, exactly
    torch.testing.assert_close(log, generator, rtol=0, atol=2e-13)
    torch.testing.assert_close(torch.linalg.matrix_exp(log), rotation, rtol=0, atol=2e-13)


def test_rotation_log_of_plane_rotations_is_their_angles():
    # independent of any matrix function: a 2x2 rotation by a has the logarithm a J; repeated angles and a
    # fixed subspace (eigenvalue 1, multiplicity 3) as block rotations have
    angles = torch.tensor([0.7, 0.7, -2.9, 1e-7])
    rotation = torch.block_diag(plane_rotations(angles), identity(3))
    want = torch.block_diag(*[torch.tensor([[0.0, -a], [a, 0.0]], dtype=F64) for a in angles.tolist()],
                            torch.zeros(3, 3, dtype=F64))
    torch.testing.assert_close(methods.rotation_log(rotation), want, rtol=0, atol=1e-13)
    assert methods.rotation_log(identity(5)).abs().max() == 0


@pytest.mark.parametrize("matrix,reason", [
    (torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64)), "det -1 (a reflection)"),
    (plane_rotations(torch.tensor([math.pi, 0.4])), "an eigenvalue at -1 (a half turn)"),
    (1.01 * identity(3), "not orthogonal"),
])
def test_rotation_log_refuses_what_has_no_principal_logarithm(matrix, reason):
    with pytest.raises(methods.NoLogarithm, match=reason.replace("(", r"\(").replace(")", r"\)")):
        methods.rotation_log(matrix)


def test_procrustes_recovers_a_rotation_and_stays_in_the_rotation_group():
    weight = torch.randn(96, 64, dtype=F64, generator=torch.Generator().manual_seed(1))   # full column rank
    rotation = torch.linalg.matrix_exp(skew(64, seed=2, norm=1.0))
    torch.testing.assert_close(methods.procrustes(weight, weight @ rotation), rotation, rtol=0, atol=1e-12)
    # W = diag(3, 2, 1), W' = W diag(1, 1, -1): W^T W' = diag(9, 4, -1); the best orthogonal map is the
    # reflection diag(1, 1, -1); the best rotation flips the weakest direction back: I
    weight = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))
    found = methods.procrustes(weight, weight @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64)))
    torch.testing.assert_close(found, identity(3), rtol=0, atol=1e-15)


def test_procrustes_where_the_weight_does_not_determine_the_rotation_stays_closest_to_identity():
    weight = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(0))   # out < in: W^T W' singular
    torch.testing.assert_close(methods.procrustes(weight, weight), identity(16), rtol=0, atol=1e-13)
    rotation = torch.linalg.matrix_exp(skew(16, seed=3, norm=0.5))
    found = methods.procrustes(weight, weight @ rotation)
    torch.testing.assert_close(weight @ found, weight @ rotation, rtol=0, atol=1e-13)   # the fit is exact
    torch.testing.assert_close(found.T @ found, identity(16), rtol=0, atol=1e-13)
    assert torch.linalg.det(found) == pytest.approx(1.0, abs=1e-12)
    assert torch.trace(found) >= torch.trace(rotation) - 1e-12   # of the exact fits, the nearest to I


def test_orthomerge_of_one_rotation_at_weight_one_is_that_rotation():
    rotation = torch.linalg.matrix_exp(skew(32, seed=4, norm=2.5))
    scale = torch.linspace(0.5, 1.5, 8, dtype=F64)
    residual = torch.randn(8, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    merged = methods.orthomerge([methods.Split(rotation, scale, residual)], [1.0])
    torch.testing.assert_close(merged.rotation, rotation, rtol=0, atol=1e-13)
    torch.testing.assert_close(merged.scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(merged.residual, residual, rtol=0, atol=0)


def test_orthomerge_of_non_commuting_rotations_is_orthogonal_and_a_lie_algebra_mean():
    a, b = skew(16, seed=6, norm=1.2), skew(16, seed=7, norm=1.2)
    assert (a @ b - b @ a).abs().max() > 0.1                    # they do not commute
    splits = [methods.Split(torch.linalg.matrix_exp(a)), methods.Split(torch.linalg.matrix_exp(b))]
    merged = methods.orthomerge(splits, [0.3, 0.7])
    torch.testing.assert_close(merged.rotation.T @ merged.rotation, identity(16), rtol=0, atol=1e-13)
    assert torch.linalg.det(merged.rotation) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(merged.rotation, torch.linalg.matrix_exp(0.3 * a + 0.7 * b), rtol=0, atol=1e-12)
    assert merged.scale is None and merged.residual is None


def test_orthomerge_names_the_input_whose_rotation_has_no_logarithm():
    good = methods.Split(torch.linalg.matrix_exp(skew(4, seed=8, norm=0.3)))
    bad = methods.Split(torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=F64)))
    with pytest.raises(methods.NoLogarithm) as error:
        methods.orthomerge([good, bad], [0.5, 0.5])
    assert error.value.index == 1 and "det -1" in error.value.reason


def test_magnitude_correction_keeps_the_direction_and_restores_the_mean_angle():
    # the paper's uniform form, written out: G = (1/n) (sum |L_i| / |sum L_i|) sum L_i
    logs = [skew(12, seed=20 + i, norm=0.4 + 0.3 * i) for i in range(3)]
    total = sum(logs[1:], logs[0])
    want = total * (sum(L.norm() for L in logs) / total.norm()) / 3
    splits = [methods.Split(torch.linalg.matrix_exp(L)) for L in logs]
    corrected = methods.orthomerge(splits, [1 / 3] * 3, magnitude_correction=True).rotation
    torch.testing.assert_close(corrected, torch.linalg.matrix_exp(want), rtol=0, atol=1e-12)
    torch.testing.assert_close(corrected.T @ corrected, identity(12), rtol=0, atol=1e-13)
    plain = methods.orthomerge(splits, [1 / 3] * 3).rotation
    # the plain mean of generators pointing apart turns less than the inputs do; the corrected one does not
    assert methods.rotation_log(plain).norm() < 0.8 * want.norm()
    torch.testing.assert_close(methods.rotation_log(corrected).norm(), want.norm(), rtol=1e-12, atol=0)
    # weights: the norm is sum |w_i| |L_i| (a negative weight turns the direction, not the magnitude)
    weighted = methods.orthomerge(splits[:2], [0.7, -0.2], magnitude_correction=True).rotation
    direction = 0.7 * logs[0] - 0.2 * logs[1]
    size = 0.7 * logs[0].norm() + 0.2 * logs[1].norm()
    torch.testing.assert_close(weighted, torch.linalg.matrix_exp(direction * (size / direction.norm())),
                               rtol=0, atol=1e-12)


def test_magnitude_correction_leaves_one_input_equal_inputs_and_cancelling_inputs_alone():
    L = skew(8, seed=30, norm=0.9)
    one = methods.Split(torch.linalg.matrix_exp(L))
    for splits, weights in (([one], [1.0]), ([one, one], [0.5, 0.5])):
        merged = methods.orthomerge(splits, weights, magnitude_correction=True).rotation
        torch.testing.assert_close(merged, one.rotation, rtol=0, atol=1e-13)
    back = methods.Split(torch.linalg.matrix_exp(-L))
    merged = methods.orthomerge([one, back], [0.5, 0.5], magnitude_correction=True).rotation
    torch.testing.assert_close(merged, identity(8), rtol=0, atol=1e-13)   # G = 0 stays 0


# ---------------------------------------------------------------- the pass

def compile_adapters(*adapters, factory=hf_llama):
    model, args = factory()
    reference = copy.deepcopy(model)
    compiled = surgeon.compile(model, args, {"adapters": list(adapters)}, {"use_cache": False})
    return compiled, args, reference


def site_of(compiled, name, path):
    return next(s for s in compiled.adapters[name].sites if s.path == path)


def set_param(compiled, name, path, param, value):
    with torch.no_grad():
        get_tensor(compiled.module, site_of(compiled, name, path).params[param]).copy_(value)


def base_weight(compiled, path) -> torch.Tensor:
    state = next(s for s in compiled.adapters.values() if any(t.path == path for t in s.sites))
    return get_tensor(compiled.module, site_of(compiled, state.spec.name, path).weight).detach().double()


def deltas_of(compiled, name):
    state = compiled.adapters[name]
    return {s.path: site_delta(compiled.module, state, s).double() for s in state.sites}


def with_weights(reference, weights: dict[str, torch.Tensor]):
    """The eager reference model with the given modules' weights replaced (float32)."""
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for path, weight in weights.items():
            model.get_submodule(path).weight.copy_(weight.float())
    return model


def cayley_angles(q: torch.Tensor) -> torch.Tensor:
    """The angle of each 2x2 block of the input map x -> x M for packed upper entries q: Q = [[0, q], [-q, 0]]
    and M = (I - Q)(I + Q)^-1 = [[1 - q^2, -2q], [2q, 1 - q^2]] / (1 + q^2), a rotation by 2 atan(q)."""
    return 2 * torch.atan(q.double())


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_two_block_rotations_at_half_each_are_their_geodesic_midpoint(kind):
    # 2x2 blocks: each adapter turns every input plane by its own angle; the merge turns it halfway, computed
    # here from the parameters with atan and the geodesic formula R1 exp(log(R1^T R2) / 2) on angles
    options = {"block_size": 2}
    compiled, args, reference = compile_adapters(
        {"name": "a", "type": kind, "targets": ["*.q_proj", "*.v_proj"], **options},
        {"name": "b", "type": kind, "targets": ["*.q_proj", "*.v_proj"], **options})
    gen = torch.Generator().manual_seed(11)
    expected, scales = {}, {}
    for state in compiled.adapters.values():
        for site in state.sites:
            if kind == "oft":
                q = (torch.rand(site.in_features // 2, 1, generator=gen) * 1.6 - 0.8)
                set_param(compiled, state.spec.name, site.path, "oft_R", q)
            else:   # BOFT: X (1, blocks, 2, 2), Q = (X - X^T) / 2, so q = (X01 - X10) / 2; s a trained output scale
                x = torch.rand(1, site.in_features // 2, 2, 2, generator=gen) * 1.6 - 0.8
                set_param(compiled, state.spec.name, site.path, "boft_R", x)
                q = ((x[0, :, 0, 1] - x[0, :, 1, 0]) / 2)[:, None]
                s = 1 + 0.2 * torch.randn(site.out_features, generator=gen)
                set_param(compiled, state.spec.name, site.path, "boft_s", s)
                scales.setdefault(site.path, []).append(s.double())
            expected.setdefault(site.path, []).append(cayley_angles(q[:, 0]))
    before = logits(compiled.module, args)
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "orthomerge", "weights": [0.5, 0.5],
                                 "into": "ab"}}])
    row = compiled.report.rows[-1]
    assert row.matches == 4 and row.check == "changes function"          # q, v in 2 layers
    assert [n for n in row.notes if "its rotation on 4 modules (exact, no residual)" in n] != []
    assert not adapter_nodes(compiled.module, "a") and not adapter_nodes(compiled.module, "b")
    assert compiled.adapters["ab"].spec.type == "delta"
    assert not torch.equal(before, logits(compiled.module, args))
    merged_weights = {}
    for path, (first, second) in expected.items():
        gap = torch.atan2(torch.sin(second - first), torch.cos(second - first))
        middle = plane_rotations(first + gap / 2)                        # the input map M of the midpoint
        weight = base_weight(compiled, path)
        want = weight @ middle.T                                         # W' = W M^T
        if kind == "boft":
            want = ((scales[path][0] + scales[path][1]) / 2)[:, None] * want
        got = weight + deltas_of(compiled, "ab")[path]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)         # float32 storage of the delta
        merged_weights[path] = want
    ok, detail = compare([logits(with_weights(reference, merged_weights), args)], [logits(compiled.module, args)],
                         "close")
    assert ok, detail


@pytest.mark.parametrize("kind,options", [("oft", {"block_size": 16}), ("boft", {"block_size": 8}),
                                          ("hra", {"rank": 4})])
def test_one_rotation_with_itself_at_weight_one_reproduces_it(kind, options):
    compiled, args, reference = compile_adapters(
        {"name": "a", "type": kind, "targets": ["*.q_proj", "*.v_proj"], **options},
        {"name": "b", "type": kind, "targets": ["*.q_proj", "*.v_proj"], **options})
    randomize_adapters(compiled.module, seed=5)
    for site in compiled.adapters["a"].sites:                            # b is a copy of a
        for param, target in site.params.items():
            value = get_tensor(compiled.module, target).detach().clone()
            if param == "boft_s":
                value = 1 + value
                set_param(compiled, "a", site.path, param, value)
            set_param(compiled, "b", site.path, param, value)
    want = deltas_of(compiled, "a")
    compiled.apply([{"remove": {"adapters": ["b"]}}])
    alone = logits(compiled.module, args)
    compiled.apply([{"combine": {"adapters": ["a"], "method": "orthomerge", "weights": [1], "into": "a1"}}])
    for path, delta in deltas_of(compiled, "a1").items():
        torch.testing.assert_close(delta, want[path], rtol=0, atol=1e-7)
    ok, detail = compare([alone], [logits(compiled.module, args)], "close")
    assert ok, detail
    # the same rotation twice at 1/2 each is that rotation again (the mean of equal logarithms)
    compiled, args, _ = compile_adapters(
        {"name": "a", "type": kind, "targets": ["*.q_proj", "*.v_proj"], **options},
        {"name": "b", "type": kind, "targets": ["*.q_proj", "*.v_proj"], **options})
    randomize_adapters(compiled.module, seed=5)
    for site in compiled.adapters["a"].sites:
        for param, target in site.params.items():
            value = get_tensor(compiled.module, target).detach().clone()
            value = 1 + value if param == "boft_s" else value
            set_param(compiled, "a", site.path, param, value)
            set_param(compiled, "b", site.path, param, value)
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "orthomerge", "weights": [0.5, 0.5]}}])
    for path, delta in deltas_of(compiled, "a_b_orthomerge").items():
        torch.testing.assert_close(delta, want[path], rtol=0, atol=1e-7)


def test_merged_rotation_of_three_kinds_is_orthogonal():
    compiled, _, _ = compile_adapters(
        {"name": "o", "type": "oft", "targets": ["*.q_proj"], "block_size": 16},
        {"name": "b", "type": "boft", "targets": ["*.q_proj"], "block_size": 4, "butterfly_factor": 2},
        {"name": "h", "type": "hra", "targets": ["*.q_proj"], "rank": 6})
    randomize_adapters(compiled.module, seed=9)
    path = Q_PROJ[0]
    weight = base_weight(compiled, path)
    rotations = []
    for name in ("o", "b", "h"):
        site = site_of(compiled, name, path)
        params = {p: get_tensor(compiled.module, t).detach() for p, t in site.params.items()}
        rotation = compiled.adapters[name].spec.kind.rotation(params, site.options, weight)
        torch.testing.assert_close(rotation.matrix.T @ rotation.matrix, identity(64), rtol=0, atol=1e-12)
        if name != "b":   # the kind's own merge is W R (BOFT: diag(s) W R)
            torch.testing.assert_close(weight @ rotation.matrix - weight,
                                       compiled.adapters[name].spec.kind.delta_weight(params, site.options, weight),
                                       rtol=0, atol=1e-13)
        rotations.append(methods.Split(rotation.matrix))
    merged = methods.orthomerge(rotations, [0.5, 0.3, 0.2]).rotation
    torch.testing.assert_close(merged.T @ merged, identity(64), rtol=0, atol=1e-12)
    assert torch.linalg.det(merged) == pytest.approx(1.0, abs=1e-10)
    compiled.apply([{"combine": {"adapters": ["o", "b", "h"], "method": "orthomerge", "weights": [0.5, 0.3, 0.2]}}])
    assert compiled.report.rows[-1].matches == 2


def test_additive_kinds_split_by_procrustes_recover_a_rotation_held_as_a_delta():
    # a `delta` adapter whose update is exactly W B (B: 2x2 plane rotations) is split into B and no residual;
    # with an OFT adapter of 2x2 blocks at weights [1, 1] the angles add (the planes commute)
    compiled, args, reference = compile_adapters(
        {"name": "o", "type": "oft", "targets": ["*.q_proj"], "block_size": 2},
        {"name": "d", "type": "delta", "targets": ["*.q_proj"]})
    gen = torch.Generator().manual_seed(12)
    expected = {}
    for path in Q_PROJ:
        q = torch.rand(32, 1, generator=gen) * 1.2 - 0.6
        set_param(compiled, "o", path, "oft_R", q)
        psi = (torch.rand(32, generator=gen) * 1.2 - 0.6).double()
        weight = base_weight(compiled, path)
        set_param(compiled, "d", path, "delta", (weight @ plane_rotations(psi) - weight).float())
        delta = deltas_of(compiled, "d")[path]          # as stored (float32): W' = W + delta
        expected[path] = (weight, -cayley_angles(q[:, 0]) + psi, delta)   # OFT's W' = W M^T turns by -2 atan q
    compiled.apply([{"combine": {"adapters": ["o", "d"], "method": "orthomerge", "into": "od"}}])
    notes = compiled.report.rows[-1].notes
    split = next(n for n in notes if n.startswith("d: Procrustes split on 2 modules"))
    assert float(split.rsplit(" ", 1)[1]) < 1e-5        # |E| / |dW|: the float32-stored delta is a rotation
    merged = {}
    for path, (weight, angles, _) in expected.items():
        want = weight @ plane_rotations(angles)
        torch.testing.assert_close(weight + deltas_of(compiled, "od")[path], want, rtol=0, atol=1e-6)
        merged[path] = want
    ok, detail = compare([logits(with_weights(reference, merged), args)], [logits(compiled.module, args)], "close")
    assert ok, detail


def test_lora_at_weight_one_through_procrustes_is_that_lora_and_residuals_merge_linearly():
    compiled, args, _ = compile_adapters(
        {"name": "a", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
        {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.o_proj"], "rank": 2})
    randomize_adapters(compiled.module, seed=3)
    want_a, want_b = deltas_of(compiled, "a"), deltas_of(compiled, "b")
    compiled.apply([{"remove": {"adapters": ["b"]}}])
    alone = logits(compiled.module, args)
    compiled.apply([{"combine": {"adapters": ["a"], "method": "orthomerge", "into": "a1"}}])
    got = deltas_of(compiled, "a1")
    assert got.keys() == want_a.keys()
    for path in want_a:                                  # W R + (W' - W R) == W', v_proj's singular W^T W' too
        torch.testing.assert_close(got[path], want_a[path], rtol=0, atol=1e-7)
    ok, detail = compare([alone], [logits(compiled.module, args)], "close")
    assert ok, detail
    notes = compiled.report.rows[-1].notes
    assert any(n.startswith("a: Procrustes split on 4 modules, residual |E| / |dW| at most") for n in notes)
    # a module only one input has: the other contributes R = I, E = 0, so a weight w scales that input's
    # generator and residual; at w = 1 it is that input's update
    compiled, args, _ = compile_adapters(
        {"name": "a", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
        {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.o_proj"], "rank": 2})
    randomize_adapters(compiled.module, seed=3)
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "orthomerge", "into": "ab"}}])
    assert compiled.report.rows[-1].matches == 6         # the union: q, v, o in 2 layers
    got = deltas_of(compiled, "ab")
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj"):
        only = want_a.get(path, want_b.get(path))
        torch.testing.assert_close(got[path], only, rtol=0, atol=1e-7)


def test_gpt2_conv1d_sites_rotate_in_out_x_in_layout():
    compiled, args, _ = compile_adapters({"name": "a", "type": "oft", "targets": ["*.c_attn"], "block_size": 8},
                                         factory=hf_gpt2)
    randomize_adapters(compiled.module, seed=4)
    before = logits(compiled.module, args)
    want = deltas_of(compiled, "a")
    compiled.apply([{"combine": {"adapters": ["a"], "method": "orthomerge", "into": "a1"}}])
    assert {s.op for s in compiled.adapters["a1"].sites} == {"addmm"}
    for path, delta in deltas_of(compiled, "a1").items():
        torch.testing.assert_close(delta, want[path], rtol=0, atol=1e-7)
    ok, detail = compare([before], [logits(compiled.module, args)], "close")
    assert ok, detail


def test_rank_truncates_the_orthomerged_delta():
    compiled, _, _ = compile_adapters({"name": "a", "type": "oft", "targets": ["*.q_proj"], "block_size": 16},
                                      {"name": "b", "type": "oft", "targets": ["*.q_proj"], "block_size": 16})
    randomize_adapters(compiled.module, seed=6)
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "orthomerge", "rank": 8, "into": "ab"}}])
    state = compiled.adapters["ab"]
    assert state.spec.type == "lora" and {s.options["rank"] for s in state.sites} == {8}
    assert len([n for n in compiled.report.rows[-1].notes if "truncation" in n]) == 2


# ---------------------------------------------------------------- refusals, before the graph is touched

@pytest.mark.parametrize("adapter,reason", [
    ({"type": "ether"}, "cannot orthomerge adapter 'x' (ether): H = blockdiag(I - 2 u u^T / |u|^2) reflects the "
                        "output rows: each block has det -1"),
    ({"type": "hra", "rank": 3}, "cannot orthomerge adapter 'x' (hra): rank 3 is odd: H is a product of 3 "
                                 "reflections, det -1"),
    ({"type": "hra", "rank": 2, "apply_GS": True}, "cannot orthomerge adapter 'x' (hra): apply_GS"),
    ({"type": "oft", "block_size": 16, "use_cayley_neumann": True},
     "cannot orthomerge adapter 'x' (oft): use_cayley_neumann: PEFT's truncated Neumann series is not exactly "
     "orthogonal"),
])
def test_rotations_without_a_logarithm_are_refused_with_the_reason(adapter, reason):
    compiled, args, _ = compile_adapters({"name": "o", "type": "oft", "targets": ["*.q_proj"], "block_size": 16},
                                         {"name": "x", "targets": ["*.q_proj"], **adapter})
    randomize_adapters(compiled.module, seed=2)
    before = logits(compiled.module, args)
    with pytest.raises(surgeon.SpecError, match=reason.replace("(", r"\(").replace(")", r"\)")
                       .replace("^", r"\^").replace("|", r"\|").replace("+", r"\+")):
        compiled.apply([{"combine": {"adapters": ["o", "x"], "method": "orthomerge"}}])
    assert [compiled.adapters[n].status for n in ("o", "x")] == ["inserted", "inserted"]
    assert torch.equal(before, logits(compiled.module, args))


def test_a_half_turn_is_refused_naming_the_module():
    # HRA with u1 = e1, u2 = e2: H = (I - 2 e1 e1^T)(I - 2 e2 e2^T) = diag(-1, -1, 1, ...), a half turn
    compiled, args, _ = compile_adapters({"name": "h", "type": "hra", "targets": ["*.q_proj"], "rank": 2})
    set_param(compiled, "h", Q_PROJ[1], "hra_u", torch.eye(64)[:, :2])
    with pytest.raises(surgeon.SpecError, match=f"cannot orthomerge adapter 'h' \\(hra\\) at '{Q_PROJ[1]}': its "
                                                "rotation has an eigenvalue at -1 \\(a half turn\\)"):
        compiled.apply([{"combine": {"adapters": ["h"], "method": "orthomerge"}}])
    assert compiled.adapters["h"].status == "inserted" and adapter_nodes(compiled.module, "h")


def test_a_kind_without_an_exact_delta_is_refused_with_its_reason(monkeypatch):
    compiled, _, _ = compile_adapters({"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 2})
    import surgeon.spec

    table = surgeon.spec.kinds()
    opaque = dataclasses.replace(table["lora"], delta_weight=None, refuse_merge="a tanh sits in its branch")
    monkeypatch.setattr(surgeon.spec, "kinds", lambda: {**table, "lora": opaque})
    with pytest.raises(surgeon.SpecError, match="cannot combine adapter 'a' \\(lora\\): a tanh sits in its branch"):
        compiled.apply([{"combine": {"adapters": ["a"], "method": "orthomerge"}}])


@pytest.fixture(scope="module")
def one_oft():
    return compile_adapters({"name": "a", "type": "oft", "targets": ["*.q_proj"], "block_size": 16})[0]


@pytest.mark.parametrize("option,value", [("density", 0.5), ("seed", 0)])
def test_orthomerge_takes_no_density_or_seed(one_oft, option, value):
    with pytest.raises(surgeon.SpecError, match=f"method 'orthomerge' takes no '{option}'"):
        one_oft.apply([{"combine": {"adapters": ["a"], "method": "orthomerge", option: value}}])
    assert one_oft.adapters["a"].status == "inserted"


def test_the_pass_applies_magnitude_correction_when_asked_and_refuses_it_elsewhere():
    compiled, _, _ = compile_adapters(
        {"name": "a", "type": "oft", "targets": ["*.q_proj"], "block_size": 16},
        {"name": "b", "type": "oft", "targets": ["*.q_proj"], "block_size": 16})
    randomize_adapters(compiled.module, seed=21)
    want = {}
    for path in Q_PROJ:
        weight = base_weight(compiled, path)
        splits = []
        for name in ("a", "b"):
            site = site_of(compiled, name, path)
            params = {p: get_tensor(compiled.module, t).detach() for p, t in site.params.items()}
            splits.append(methods.Split(compiled.adapters[name].spec.kind.rotation(params, site.options,
                                                                                   weight).matrix.double()))
        logs = [methods.rotation_log(s.rotation) for s in splits]
        total = 0.5 * logs[0] + 0.5 * logs[1]
        corrected = total * ((0.5 * logs[0].norm() + 0.5 * logs[1].norm()) / total.norm())
        want[path] = weight @ torch.linalg.matrix_exp(corrected) - weight
    for bad, key, message in (({"method": "linear", "magnitude_correction": True}, "magnitude_correction",
                               "takes no 'magnitude_correction'"),
                              ({"method": "orthomerge", "magnitude_correction": "yes"}, "magnitude_correction",
                               "must be true or false")):
        with pytest.raises(surgeon.SpecError, match=message) as error:
            compiled.apply([{"combine": {"adapters": ["a", "b"], "weights": [0.5, 0.5], **bad}}])
        assert key in str(error.value)
    assert set(compiled.adapters) == {"a", "b"}                           # the refusals changed nothing
    compiled.apply([{"combine": {"adapters": ["a", "b"], "method": "orthomerge", "weights": [0.5, 0.5],
                                 "magnitude_correction": True, "into": "ab"}}])
    for path, delta in deltas_of(compiled, "ab").items():
        torch.testing.assert_close(delta, want[path], rtol=0, atol=1e-7)
