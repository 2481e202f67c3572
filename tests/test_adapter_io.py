"""Adapter files: surgeon's safetensors + JSON round trip, and atomic writes."""
from __future__ import annotations

import json

import pytest
import torch

import surgeon
from tests.conftest import hf_gpt2, hf_llama, lora_spec, randomize_adapters
from tests.passes.helpers import logits

KW = {"use_cache": False}


@pytest.mark.parametrize("factory,targets", [(hf_llama, ["*.q_proj", "*.up_proj"]), (hf_gpt2, ["*.c_attn"])])
def test_save_load_round_trip_reproduces_outputs(factory, targets, tmp_path):
    model, args = factory()
    compiled = surgeon.compile(model, args, lora_spec(targets, rank=4, use_rslora=True), KW)
    randomize_adapters(compiled.module)
    expected = logits(compiled.module, args)
    compiled.save_adapter("chat", tmp_path / "chat")
    config = json.loads((tmp_path / "chat" / "adapter_config.json").read_text())
    assert config["type"] == "lora" and config["options"]["use_rslora"] is True
    reloaded = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "chat")}]}, KW)
    torch.testing.assert_close(logits(reloaded.module, args), expected, rtol=0, atol=0)
    assert reloaded.report.rows[-1].check == "changes function"


def test_saved_after_merge_is_the_same_adapter(tmp_path):
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj"], rank=2), KW)
    randomize_adapters(compiled.module)
    before = compiled.adapter_weights("chat")
    compiled.apply(["merge"])
    compiled.save_adapter("chat", tmp_path)
    reloaded = surgeon.compile(model, args, {"adapters": [{"name": "c", "from_dir": str(tmp_path)}]}, KW)
    for path, params in reloaded.adapter_weights("c").items():
        for name, tensor in params.items():
            assert torch.equal(tensor, before[path][name])


def test_loaded_shapes_must_fit_the_model(tmp_path):
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj"], rank=2), KW)
    compiled.save_adapter("chat", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["targets"] = [t.replace("q_proj", "k_proj") for t in config["targets"]]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(surgeon.SpecError, match="weights name modules"):
        surgeon.compile(model, args, {"adapters": [{"name": "c", "from_dir": str(tmp_path)}]}, KW)


def test_save_folder_contents(tmp_path):
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj"], rank=2, pipeline=("insert", "merge")), KW)
    out = compiled.save(tmp_path / "run")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapters", "graph.dot", "graph.html", "graph.py", "groups.json", "nodes.json", "nodes_before.json",
                     "report.json", "report.txt", "spec.yaml"]
    assert surgeon.load_spec(out / "spec.yaml").adapters[0].targets == ("*.q_proj",)
    nodes = json.loads((out / "nodes.json").read_text())
    assert {n["pass"] for n in nodes} >= {"capture"}
    assert not list(tmp_path.glob("**/*.tmp"))
