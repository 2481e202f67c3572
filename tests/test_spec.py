"""Spec validation: every malformed case raises SpecError naming the key, and the model is untouched."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from tests.conftest import assert_untouched, hf_llama, lora_spec, snapshot

KW = {"use_cache": False}


@pytest.fixture(scope="module")
def model_and_args():
    return hf_llama()


def good():
    return lora_spec(["*.q_proj"])


def with_adapter(**changes):
    spec = good()
    spec["adapters"][0].update(changes)
    for key, value in list(changes.items()):
        if value is None:
            del spec["adapters"][0][key]
    return spec


CASES = [
    ("unknown top-level key", {**good(), "pipelin": ["insert"]}, "pipelin", "unknown key"),
    ("unknown adapter key", with_adapter(rnak=4), "adapters[0].rnak", "unknown key"),
    ("unknown adapter type", with_adapter(type="lorax"), "adapters[0].type", "unknown adapter type"),
    ("unknown pass", {**good(), "pipeline": ["insert", "mrege"]}, "pipeline[1]", "unknown pass"),
    ("unknown pass option", {**good(), "pipeline": [{"merge": {"adaptors": ["chat"]}}]}, "pipeline[0].merge.adaptors",
     "unknown option"),
    ("target matches nothing", with_adapter(targets=["*.qq_proj"]), "adapters[0].targets[0]", "matches no module"),
    ("rank zero", with_adapter(rank=0), "adapters[0].rank", "positive"),
    ("rank negative", with_adapter(rank=-2), "adapters[0].rank", "positive"),
    ("rank not an int", with_adapter(rank="8"), "adapters[0].rank", "integer"),
    ("rank float", with_adapter(rank=4.0), "adapters[0].rank", "integer"),
    ("rank exceeds dims", with_adapter(rank=65, init="pissa"), "adapters[0].rank", "exceeds"),   # PiSSA: r <= min
    ("missing name", with_adapter(name=None), "adapters[0].name", "missing"),
    ("missing targets", with_adapter(targets=None), "adapters[0].targets", "non-empty list"),
    ("duplicate name", {"adapters": good()["adapters"] * 2, "pipeline": ["insert"]}, "adapters[1].name", "duplicate"),
    ("merge names unknown adapter", {**good(), "pipeline": ["insert", {"merge": {"adapters": ["chit"]}}]},
     "pipeline[1].merge.adapters", "unknown adapter 'chit'"),
    ("missing from_peft folder", {"adapters": [{"name": "x", "from_peft": "/nonexistent/peft"}]},
     "adapters[0].from_peft", "does not exist"),
    ("adapters not a list", {"adapters": {"name": "x"}}, "adapters", "must be a list"),
    ("spec not a mapping", ["insert"], "<spec>", "must be a mapping"),
]


@pytest.mark.parametrize("case,spec,key,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_raises_spec_error(model_and_args, case, spec, key, words):
    model, args = model_and_args
    before = snapshot(model)
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.compile(model, args, spec, KW)
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)
    assert_untouched(model, before)


def test_malformed_peft_folder(tmp_path, model_and_args):
    model, args = model_and_args
    before = snapshot(model)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(surgeon.SpecError, match="not valid JSON") as info:
        surgeon.compile(model, args, {"adapters": [{"name": "x", "from_peft": str(tmp_path)}]}, KW)
    assert info.value.key == "adapters[0].from_peft"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(surgeon.SpecError, match="not a readable safetensors"):
        surgeon.compile(model, args, {"adapters": [{"name": "x", "from_peft": str(tmp_path)}]}, KW)
    assert_untouched(model, before)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"\x00garbage" * 10   # files untouched


def test_yaml_errors_name_the_file_line(tmp_path, model_and_args):
    model, args = model_and_args
    path = tmp_path / "spec.yaml"
    path.write_text("adapters:\n  - name: chat\n    type: lora\n    targets: ['*.q_proj']\n    rank: -1\n"
                    "pipeline: [insert]\n")
    with pytest.raises(surgeon.SpecError) as info:
        surgeon.compile(model, args, path, KW)
    assert info.value.line == 5 and str(path) in str(info.value) and "adapters[0].rank" in str(info.value)


def test_yaml_and_toml_and_dict_give_the_same_spec(tmp_path):
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("adapters:\n  - {name: chat, type: lora, targets: ['*.q_proj'], rank: 4, alpha: 8}\n"
                         "pipeline:\n  - insert\n  - merge: {adapters: [chat]}\n")
    toml_file = tmp_path / "s.toml"
    toml_file.write_text('pipeline = ["insert", {merge = {adapters = ["chat"]}}]\n'
                         '[[adapters]]\nname = "chat"\ntype = "lora"\ntargets = ["*.q_proj"]\nrank = 4\nalpha = 8\n')
    as_dict = {"adapters": [{"name": "chat", "type": "lora", "targets": ["*.q_proj"], "rank": 4, "alpha": 8}],
               "pipeline": ["insert", {"merge": {"adapters": ["chat"]}}]}
    specs = [surgeon.load_spec(s) for s in (yaml_file, toml_file, as_dict)]
    assert specs[0].adapters == specs[1].adapters == specs[2].adapters
    assert specs[0].pipeline == specs[1].pipeline == specs[2].pipeline


def test_yaml_reads_on_and_yes_as_words_not_booleans():
    """YAML 1.1 (PyYAML's default) turns `on:` into the key True; IA3's option is named `on`."""
    spec = surgeon.load_spec("adapters:\n  - {name: s, type: ia3, targets: ['*.o_proj'], on: input}\n"
                             "pipeline: [insert, {lower: {elementwise: false}}]\n")
    assert spec.adapters[0].options["on"] == "input"
    assert spec.pipeline[1].options == {"elementwise": False}
    assert surgeon.load_spec("adapters: []\npipeline: [insert]\nseed: 3\n").pipeline[0].name == "insert"


def test_target_module_without_linear_op_is_a_spec_error(model_and_args):
    model, args = model_and_args
    with pytest.raises(surgeon.SpecError, match="select no linear/addmm/conv2d op"):
        surgeon.compile(model, args, lora_spec(["*.input_layernorm"], rank=2), KW)


def test_failed_pass_leaves_model_untouched(model_and_args):
    model, args = model_and_args
    before = snapshot(model)
    spec = lora_spec(["*.q_proj"], pipeline=("insert", "merge"))
    compiled = surgeon.compile(model, args, spec, KW)
    assert compiled.adapters["chat"].status == "merged"
    with torch.no_grad():
        compiled.module(*args)
    assert_untouched(model, before)
