"""Poly / MHR: per-task mixtures of LoRA skills, routed by each row's task id (`task_ids=` at the call and at
generate, as PEFT's); merge refused for per-row routing, exact for a fixed task, MHR-μ and the task mean."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapter_io import save_peft_dir
from surgeon.adapters import kinds
from surgeon.adapters.poly import fixed_weights, mixing_weights
from surgeon.errors import InputError
from tests.adapters.helpers import (KW, NAME, adapter_nodes, assert_close, assert_edited_checkpoint_refused,
                                    assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, randomized_peft_checkpoint, randomize_adapters)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

# hf_llama with one layer (each compile costs a capture): q_proj 64 -> 64, down_proj 128 -> 64
QD_FANS = (64 + 64) + (128 + 64)


def llama():
    return hf_llama(layers=1)
TASKS = torch.tensor([2, 0])   # one per row of the (2, 8) example


def _poly_config(**extra):
    peft = pytest.importorskip("peft")
    return peft.PolyConfig(target_modules=["q_proj", "down_proj"], r=4, n_tasks=3, n_skills=2, n_splits=2, **extra)


def _peft_logits(wrapped, args, task_ids):
    with torch.no_grad():
        return wrapped.base_model(*args, task_ids=task_ids).logits


def _import(path, **options):
    model, args = _import.model_args
    return surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(path), **options}]}, KW)


def test_poly_lifecycle(tmp_path):
    """One task (PEFT's default n_tasks=1): a call needs no task_ids; B = 0 is an exact identity."""
    model, args, compiled = compile_kind("poly", ["*.q_proj", "*.down_proj"], factory=llama, rank=4, n_skills=3)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 3 * 4 * QD_FANS + 2 * 1 * 1 * 3)   # skills r (in + out) + tasks splits skills
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)


def test_peft_parity_per_row_forward_and_generate(tmp_path):
    """A randomized PEFT Poly/MHR checkpoint (3 tasks, 2 skills, 2 splits) imports and gives PEFT's logits for
    per-row task ids, and PEFT's tokens from generate with those task ids."""
    model, args, wrapped = randomized_peft_checkpoint(_poly_config(), tmp_path, factory=llama)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
    options = compiled.adapters[NAME].spec.options
    assert (options["n_tasks"], options["n_skills"], options["n_splits"], options["routing"]) == (3, 2, 2, "rows")
    for task_ids in (TASKS, torch.tensor([1, 1]), [0, 2]):
        expected = _peft_logits(wrapped, args, torch.as_tensor(task_ids))
        assert_close(logits_with(compiled, args, task_ids), expected)
    assert not torch.allclose(logits_with(compiled, args, [0, 0]), logits_with(compiled, args, [2, 2]))
    with torch.no_grad():
        want = wrapped.base_model.generate(input_ids=args[0], task_ids=TASKS, max_new_tokens=5, do_sample=False)
    got = compiled.generate(args[0], task_ids=TASKS, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    # a left-padded row: the recompute path runs rows of one length together, each group with its rows' ids
    mask = torch.ones_like(args[0])
    mask[1, :3] = 0
    with torch.no_grad():
        want = wrapped.base_model.generate(input_ids=args[0], attention_mask=mask, task_ids=TASKS, max_new_tokens=4,
                                           do_sample=False)
    for use_cache in (False, True):
        got = compiled.generate(args[0], attention_mask=mask, task_ids=TASKS, max_new_tokens=4, use_cache=use_cache)
        assert torch.equal(got, want)


def logits_with(compiled, args, task_ids):
    with torch.no_grad():
        return compiled.module(*args, task_ids=task_ids).logits


def test_task_ids_are_checked_and_merge_is_refused_for_per_row_routing():
    _, args, compiled = compile_kind("poly", ["*.q_proj"], factory=llama, rank=2, n_tasks=3)
    with pytest.raises(InputError, match=r"routes each row by its task .*pass task_ids"):
        logits(compiled.module, args)
    with pytest.raises(InputError, match="task_ids has 3 ids but .* sees 2 rows"):
        logits_with(compiled, args, [0, 1, 2])
    with pytest.raises(InputError, match="task id 3 is not one of the poly adapter's n_tasks=3"):
        logits_with(compiled, args, [0, 3])
    with pytest.raises(InputError, match="integers"):
        logits_with(compiled, args, [0.5, 1.0])
    with pytest.raises(surgeon.SurgeonError, match="pass task_ids"):
        compiled.generate(args[0], max_new_tokens=2, do_sample=False)
    with pytest.raises(surgeon.SpecError, match=r"cannot merge adapter 'ad': its routing is per row"):
        compiled.apply(["merge"])
    assert adapter_nodes(compiled.module, NAME)


def test_fixed_task_merges_exactly_with_peft_parity(tmp_path):
    """routing: task with task_id k is PEFT with task k on every row, before and after merge; unmerge restores."""
    model, args, wrapped = randomized_peft_checkpoint(_poly_config(), tmp_path, factory=llama)
    _import.model_args = (model, args)
    compiled = _import(tmp_path, routing="task", task_id=1)
    expected = _peft_logits(wrapped, args, torch.tensor([1, 1]))
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["unmerge"])
    assert adapter_nodes(compiled.module, NAME)
    assert_close(logits(compiled.module, args), expected)


def _peft_layer(n_splits=2, **overrides):
    peft = pytest.importorskip("peft")
    from peft.tuners.poly.layer import Linear as PolyLinear

    config = peft.PolyConfig(r=3, n_tasks=4, n_skills=3, n_splits=n_splits, init_weights=False)
    layer = PolyLinear(torch.nn.Linear(12, 8), "default", config).eval()
    # detached views of PEFT's own tensors: the logits drawn below are the layer's too
    params = {"poly_lora_A": layer.poly_lora_A["default"].detach(),
              "poly_lora_B": layer.poly_lora_B["default"].detach(),
              "poly_router": layer.poly_router["default"].module_logits.detach()}
    with torch.no_grad():
        params["poly_router"].normal_(generator=torch.Generator().manual_seed(3))
    opts = {"rank": 3, "n_tasks": 4, "n_skills": 3, "n_splits": n_splits, "init": "default", "task_id": 0,
            **overrides}
    return layer, params, opts


def _peft_delta(layer, task_ids):
    """ΔW (out x in) of the PEFT layer for one routing: its update on the identity's rows."""
    eye = torch.eye(layer.in_features)[None].expand(len(task_ids), -1, -1)
    with torch.no_grad():
        return (layer(eye, task_ids=task_ids) - layer.base_layer(eye)).mean(0).T


@pytest.mark.parametrize("n_splits", [1, 2])
def test_delta_of_a_fixed_task_is_peft_update(n_splits):
    layer, params, opts = _peft_layer(n_splits, routing="task", task_id=2)
    delta = kinds()["poly"].delta_weight(params, opts, layer.base_layer.weight.detach())
    assert delta.shape == (8, 12) and delta.dtype == torch.float32
    torch.testing.assert_close(delta, _peft_delta(layer, torch.tensor([2])), rtol=1e-5, atol=1e-6)


def test_mu_is_the_plain_average_of_the_skills():
    """MHR-μ: every head's skills weighted 1 / n_skills, whatever the router says: PEFT's update with equal
    logits for every skill (σ(0) / (n σ(0)) = 1 / n), and ΔW = (mean_s A)(mean_s B) / r per head."""
    layer, params, opts = _peft_layer(2, routing="mu")
    delta = kinds()["poly"].delta_weight(params, opts, layer.base_layer.weight.detach().double())
    A, B = params["poly_lora_A"].double().mean(1), params["poly_lora_B"].double().mean(1)   # heads x d x r, r x d
    by_hand = (torch.cat(list(A), 0) @ torch.cat(list(B), 1)).T / 3
    torch.testing.assert_close(delta, by_hand, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.poly_router["default"].module_logits.zero_()
    torch.testing.assert_close(delta.float(), _peft_delta(layer, torch.tensor([0])), rtol=1e-5, atol=1e-6)


def test_task_mean_averages_peft_routing_over_tasks():
    layer, params, opts = _peft_layer(2, routing="task_mean")
    router = layer.poly_router["default"]
    with torch.no_grad():
        want = router(task_ids=torch.arange(4), input_ids=None).mean(0, keepdim=True)
    torch.testing.assert_close(fixed_weights(params["poly_router"], opts), want)
    # with per-task weights w_t, the task mean is one routing: its ΔW is no mean of the tasks' ΔWs
    delta = kinds()["poly"].delta_weight(params, opts, layer.base_layer.weight.detach())
    assert torch.linalg.matrix_rank(delta) <= 3


@pytest.mark.parametrize("routing", ["mu", "task_mean"])
def test_mu_and_task_mean_merge_exactly(routing):
    _, args, compiled = compile_kind("poly", ["*.q_proj", "*.down_proj"], factory=llama, rank=4, n_tasks=3,
                                     n_skills=2, n_splits=2, routing=routing)
    assert_merge(compiled, args)


def test_peft_export(tmp_path):
    """Trained in surgeon, written as PEFT's Poly, loaded in PEFT: the same logits for per-row task ids."""
    peft = pytest.importorskip("peft")
    model, args, compiled = compile_kind("poly", ["*.q_proj", "*.k_proj", "*.up_proj"], factory=llama, rank=3,
                                         n_tasks=3, n_skills=2, n_splits=2)
    randomize_adapters(compiled.module, seed=5)
    state = compiled.adapters[NAME]
    save_peft_dir(tmp_path, state.spec.options, compiled.adapter_weights(NAME), set(), kind="poly")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    for task_ids in (TASKS, torch.tensor([1, 1])):
        assert_close(logits_with(compiled, args, task_ids), _peft_logits(loaded, args, task_ids))


def test_malformed_checkpoints_are_refused(tmp_path):
    def router(config, tensors):
        key = next(k for k in tensors if k.endswith("q_proj.poly_router.module_logits"))
        tensors[key] = tensors[key][:2]

    assert_edited_checkpoint_refused(_poly_config(), tmp_path / "a", router,
                                     r"module '.*q_proj' needs poly_lora_A .* n_tasks=3.* got .*\[2, 4\]")
    assert_edited_checkpoint_refused(_poly_config(), tmp_path / "b", lambda c, t: c.update(poly_type="mhr"),
                                     "poly_type 'mhr'")


def test_split_must_divide_the_features():
    with pytest.raises(surgeon.SurgeonError, match="n_splits 3 must divide the site's 64 input and 64 output"):
        compile_kind("poly", ["*.q_proj"], factory=llama, rank=2, n_splits=3)
    opts = {**{k: o.default for k, o in kinds()["poly"].options.items()}, "n_tasks": 2, "routing": "task",
            "task_id": 2}
    with pytest.raises(ValueError, match="task_id 2 is not one of the n_tasks=2"):
        kinds()["poly"].init(opts, 8, 8, torch.float32, torch.Generator(), torch.zeros(8, 8))


def test_flattened_conv1d_rows_route_independently():
    """GPT-2's Conv1D sites see (batch * length, features): each row's tokens take that row's task, so a
    batch equals its rows run one at a time."""
    _, args, compiled = compile_kind("poly", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=2, n_tasks=3,
                                     n_skills=2)
    randomize_adapters(compiled.module)
    both = logits_with(compiled, args, TASKS)
    for row in range(2):
        alone = logits_with(compiled, (args[0][row:row + 1],), TASKS[row:row + 1])
        assert_close(alone[0], both[row])
    assert not torch.allclose(both, logits_with(compiled, args, [0, 0]))


def test_train_mode_samples_the_routing():
    """PEFT's router draws relaxed-Bernoulli gates in train mode: outputs vary per draw, gradients reach the
    routing logits; eval is deterministic sigmoids."""
    _, args, compiled = compile_kind("poly", ["*.q_proj"], factory=llama, rank=2, n_tasks=2, n_skills=3)
    randomize_adapters(compiled.module)
    evaluated = logits_with(compiled, args, [0, 1])
    compiled.module.train()
    torch.manual_seed(0)
    first = compiled.module(*args, task_ids=[0, 1]).logits
    second = compiled.module(*args, task_ids=[0, 1]).logits
    assert not torch.allclose(first, second)
    second.sum().backward()
    router = [p for n, p in compiled.module.named_parameters() if n.endswith("poly_router")]
    assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
    compiled.module.eval()
    assert torch.equal(logits_with(compiled, args, [0, 1]), evaluated)
    weights = mixing_weights(torch.zeros(2, 6), 2, 3, training=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2))


def test_t5_generate_matches_peft_with_task_ids(tmp_path):
    """Poly on T5 (the setting it was made for): generate recomputes the encoder-decoder per token; with
    verify=False the graph takes batches from 2, so a batch of one is padded with a copy of its row, which
    takes the row's task id too. Tokens equal PEFT's generate with the same task ids."""
    from tests.test_generate_encoder_decoder import NEW, prompts, t5

    peft = pytest.importorskip("peft")
    model, args, kwargs = t5()
    config = peft.PolyConfig(target_modules=["q", "v"], r=4, n_tasks=3, n_skills=2, n_splits=2)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    wrapped.save_pretrained(tmp_path)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, kwargs,
                               verify=False)
    ids, mask = prompts()
    for rows, task_ids in ((slice(None), torch.tensor([2, 0, 1])), (slice(0, 1), torch.tensor([1]))):
        with torch.no_grad():
            want = wrapped.base_model.generate(input_ids=ids[rows], attention_mask=mask[rows], task_ids=task_ids,
                                               max_new_tokens=NEW, do_sample=False)
        got = compiled.generate(ids[rows], attention_mask=mask[rows], task_ids=task_ids, max_new_tokens=NEW)
        assert torch.equal(got, want)
    other = compiled.generate(ids, attention_mask=mask, task_ids=[0, 0, 0], max_new_tokens=NEW)
    assert not torch.equal(other, compiled.generate(ids, attention_mask=mask, task_ids=[2, 2, 2], max_new_tokens=NEW))
