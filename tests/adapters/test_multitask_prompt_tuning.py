"""Multitask prompt tuning: a shared prompt times each row's task's low-rank factor, in front of the input embeddings.

Against PEFT's MultitaskPromptTuningConfig on HF LLaMA (GQA) and GPT-2, with per-row task ids: logits (n + v
positions) with and without an attention mask, greedy generate (PEFT's generate(use_cache=False)), PEFT import and
export; the lifecycle (only the prompt and the task factors train, merge refused with the reason, safetensors
round trip), the task ids a call must give, PEFT's inits from a source checkpoint, and the refusals (TEXT init,
bad checkpoints).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import surgeon
from surgeon import routing
from surgeon.errors import InputError, SpecError, SurgeonError
from tests.adapters.helpers import KW, NAME, assert_param_count, assert_round_trip, assert_trains, spec
from tests.conftest import hf_gpt2, hf_llama as _hf_llama
from tests.passes.helpers import logits

V, TASKS, RANKS = 3, 3, 2
NAMES = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
peft = pytest.importorskip("peft")


def hf_llama():
    """tests.conftest's LLaMA (GQA) with one layer: the rewrite is the same, the captures are quicker."""
    return _hf_llama(layers=1)


def _compile(factory=hf_llama, targets=("model.embed_tokens",), **options):
    model, args = factory()
    options = {"num_virtual_tokens": V, "num_tasks": TASKS, "num_ranks": RANKS, **options}
    return model, args, surgeon.compile(model, args, spec("multitask_prompt_tuning", targets, **options), KW)


def _params(compiled) -> dict[str, torch.nn.Parameter]:
    return {n.rpartition(".")[2]: p for n, p in compiled.module.named_parameters() if p.requires_grad}


def _config(**extra):
    return peft.MultitaskPromptTuningConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": V, "num_tasks": TASKS,
                                               "num_ranks": RANKS, **extra})


def _peft_with(model, params):
    """PEFT's MPT model on a copy of `model` holding surgeon's tensors."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), _config()).eval()
    encoder = wrapped.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(params["prompt_embeddings"])
        encoder.prefix_task_cols.copy_(params["prefix_task_cols"])
        encoder.prefix_task_rows.copy_(params["prefix_task_rows"])
    return wrapped


@pytest.mark.parametrize("factory,target", [(hf_llama, "model.embed_tokens"), (hf_gpt2, "transformer.wte")])
def test_logits_and_generate_match_peft_per_row(factory, target):
    model, args, compiled = _compile(factory, (target,))
    assert compiled.report.rows[-1].check == "changes function"
    params = _params(compiled)
    with torch.no_grad():   # the N(0, 0.02) factors make tiny prompts: scale them up so the tasks differ visibly
        params["prefix_task_cols"].mul_(30)
        params["prefix_task_rows"].mul_(30)
    wrapped = _peft_with(model, params)
    ids = args[0]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0   # left padding in row 0
    with torch.no_grad():
        for tasks in ([2, 0], [1, 1], torch.tensor([0, 2])):
            for kwargs in ({}, {"attention_mask": mask}):
                want = wrapped(input_ids=ids, task_ids=torch.as_tensor(tasks), **kwargs).logits
                got = compiled.module(ids, task_ids=tasks, **kwargs).logits
                assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + V, want.shape[-1])
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
        # each row reads its own task: swapping the tasks changes the rows
        assert not torch.allclose(compiled.module(ids, task_ids=[2, 0]).logits,
                                  compiled.module(ids, task_ids=[0, 2]).logits, atol=1e-4)
    tasks = torch.tensor([2, 1])
    got = compiled.generate(ids, max_new_tokens=4, do_sample=False, task_ids=tasks)
    assert torch.equal(got, wrapped.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False,
                                             task_ids=tasks))


def test_lifecycle(tmp_path):
    model, args, compiled = _compile(num_tasks=2)
    assert_param_count(compiled, V * 64 + 2 * RANKS * (V + 64))   # v x hidden + tasks x r x (v + hidden)
    with routing.given([1, 0]):   # every call below runs with these rows' tasks
        assert_trains(compiled, args)
        before = logits(compiled.module, args)
        with pytest.raises(SpecError, match="virtual tokens in front of the input sequence.*task id"):
            compiled.apply(["merge"])
        assert torch.equal(logits(compiled.module, args), before)
        assert_round_trip(compiled, model, args, tmp_path)
    assert "follows its task id" in surgeon.adapters.kinds()["multitask_prompt_tuning"].refusal({})


def test_task_ids_a_call_must_give():
    model, args, compiled = _compile()
    ids = args[0]
    with pytest.raises(InputError, match="num_tasks=3.*pass task_ids"):
        compiled.module(ids)
    with pytest.raises(InputError, match="3 ids but .* sees 2 rows"):
        compiled.module(ids, task_ids=[0, 1, 2])
    with pytest.raises(InputError, match="task id 3 is not one of"):
        compiled.module(ids, task_ids=[0, 3])
    # one task: the ids may be left out (every row is task 0)
    _, _, single = _compile(num_tasks=1)
    with torch.no_grad():
        assert torch.equal(single.module(ids).logits, single.module(ids, task_ids=[0, 0]).logits)


def test_refusals():
    with pytest.raises(SurgeonError, match="needs a tokenizer"):
        _compile(init="text")
    with pytest.raises(SurgeonError, match="reads a source MPT checkpoint: give init_source"):
        _compile(init="exact_source_task", num_tasks=1)


@pytest.mark.parametrize("init", ["exact_source_task", "average_source_tasks", "only_source_shared"])
def test_init_from_a_source_checkpoint_as_peft(tmp_path, init):
    model, args = hf_llama()
    source = peft.get_peft_model(copy.deepcopy(model), _config())
    with torch.no_grad():
        source.prompt_encoder["default"].prefix_task_cols.normal_()
    source.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tasks = 2 if init == "only_source_shared" else 1
    want = peft.get_peft_model(copy.deepcopy(model), _config(
        prompt_tuning_init=init.upper(), prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=2,
        num_tasks=tasks)).prompt_encoder["default"]
    _, _, compiled = _compile(init=init, init_source=path, init_task=2, num_tasks=tasks)
    got = _params(compiled)
    assert torch.equal(got["prompt_embeddings"].detach(), want.embedding.weight.detach())
    if init != "only_source_shared":   # (its factors are fresh draws, PEFT's and surgeon's alike)
        assert torch.allclose(got["prefix_task_cols"].detach(), want.prefix_task_cols.detach())
        assert torch.allclose(got["prefix_task_rows"].detach(), want.prefix_task_rows.detach())
        with pytest.raises(SurgeonError, match="num_tasks must be 1"):
            _compile(init=init, init_source=path, num_tasks=2)
    assert got["prefix_task_cols"].shape == (tasks, V, RANKS)
    with pytest.raises(SurgeonError, match="init_task 3 is not one of init_source's 3 tasks"):
        _compile(init="exact_source_task", init_source=path, init_task=3, num_tasks=1)


def test_from_peft_matches_and_exports_back(tmp_path):
    model, args = hf_llama()
    ids, tasks = args[0], torch.tensor([2, 0])
    torch.manual_seed(4)
    wrapped = peft.get_peft_model(copy.deepcopy(model), _config()).eval()
    encoder = wrapped.prompt_encoder["default"]
    with torch.no_grad():
        encoder.prefix_task_cols.add_(torch.randn(TASKS, V, RANKS))
        encoder.prefix_task_rows.add_(torch.randn(TASKS, RANKS, 64))
        expected = wrapped(input_ids=ids, task_ids=tasks).logits
    wrapped.save_pretrained(tmp_path / "peft")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    state = compiled.adapters[NAME]
    assert state.spec.type == "multitask_prompt_tuning"
    params = _params(compiled)
    assert torch.equal(params["prompt_embeddings"].detach(), encoder.embedding.weight.detach())
    assert torch.equal(params["prefix_task_cols"].detach(), encoder.prefix_task_cols.detach())
    assert torch.equal(params["prefix_task_rows"].detach(), encoder.prefix_task_rows.detach())
    with torch.no_grad():
        assert torch.allclose(compiled.module(ids, task_ids=tasks).logits, expected, atol=1e-5, rtol=1e-4)
        params["prefix_task_rows"].mul_(0.5)   # "trained" in surgeon
        want = compiled.module(ids, task_ids=tasks).logits
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    assert type(again.peft_config["default"]).__name__ == "MultitaskPromptTuningConfig"
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids, task_ids=tasks).logits, want, atol=1e-5, rtol=1e-4)


def test_malformed_peft_checkpoint_is_refused(tmp_path):
    model, args = hf_llama()
    peft.get_peft_model(copy.deepcopy(model), _config()).save_pretrained(tmp_path)
    config = tmp_path / "adapter_config.json"
    entry = {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}
    data = json.loads(config.read_text())
    for change, message in (({"num_tasks": TASKS + 1}, "prefix_task_cols of shape .3, 3, 2. does not fit num_tasks=4"),
                            ({"num_ranks": RANKS + 1}, "prefix_task_cols of shape .* does not fit .* num_ranks=3"),
                            ({"num_virtual_tokens": V + 1}, "prompt_embeddings of shape .* num_virtual_tokens=4"),
                            ({"num_tasks": 0}, "num_tasks must be a positive integer"),
                            ({"num_transformer_submodules": 2}, "encoder-decoder")):
        config.write_text(json.dumps({**data, **change}))
        with pytest.raises(SpecError, match=message):
            surgeon.compile(model, args, entry, KW)
