"""surgeon.compile_pretrained and `surgeon compile --model hf:PATH`: a checkpoint folder's config.json built on
the meta device and compiled structure only; with merge_to, the merged checkpoint in the folder's layout, equal
to merge_checkpoint's bit for bit (surgeon/from_folder.py, docs/large_models.md)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import surgeon
import surgeon.merge_checkpoint as mc
from surgeon.cli import main
from surgeon.graph import get_tensor
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import logits

LLAMA_TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
CASES = {
    "llama_gqa": (hf_llama, LLAMA_TARGETS, "100KB"),
    # c_attn is 32 -> 96 (stored 32 x 96 by Conv1D), attn.c_proj is square: its layout comes from the compile
    "gpt2": (hf_gpt2, ["*.c_attn", "*.attn.c_proj", "*.c_fc"], "40KB"),
}


def save_folder(build, directory: Path, shard: str):
    """The model `build` makes, saved with save_pretrained in several shards + the index; (model, inputs)."""
    model, (ids,) = build()
    model.save_pretrained(directory, max_shard_size=shard)
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").is_file(), shards
    return model, ids


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def lora(targets, **extra) -> dict:
    return {"adapters": [{"name": "a", "type": "lora", "targets": list(targets), "rank": 4, "alpha": 8, **extra}]}


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    build, targets, shard = CASES[request.param]
    model, ids = save_folder(build, tmp_path / "ckpt", shard)
    return request.param, model, ids, targets, tmp_path / "ckpt"


def test_same_sites_as_a_compile_of_the_loaded_model_and_no_weight_read(case, tmp_path):
    from transformers import AutoModelForCausalLM

    name, _, ids, targets, folder = case
    before = digests(folder)
    compiled = surgeon.compile_pretrained(folder, lora(targets))
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = surgeon.compile(loaded, (ids,), lora(targets))
    assert compiled.structure_only and compiled.merged_checkpoint is None
    assert type(compiled.original) is type(loaded)
    sites = [s.path for s in compiled.adapters["a"].sites]
    assert sites == [s.path for s in expected.adapters["a"].sites] and sites
    # the adapters as the spec's seed drew them: save_adapter writes what a compile of the loaded model writes
    for path, params in expected.adapter_weights("a").items():
        for param, tensor in params.items():
            assert torch.equal(compiled.adapter_weights("a")[path][param], tensor), (path, param)
    assert [step["weight"] for step in compiled.merge_plan()] == [step["weight"] for step in expected.merge_plan()]
    compiled.save_adapter("a", tmp_path / "fresh")
    assert json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())["targets"] == sorted(sites)
    assert digests(folder) == before
    # structure only: a folder holding config.json alone compiles the same
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((folder / "config.json").read_bytes())
    again = surgeon.compile_pretrained(bare, lora(targets), example=(3, 5))
    assert [s.path for s in again.adapters["a"].sites] == sites


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
def test_merge_to_equals_merge_checkpoint_and_loads_in_transformers(case, tmp_path, fmt):
    """A trained adapter (set by loading its folder through the spec's from_dir / from_peft) merged into the
    folder: the same bytes as merge_checkpoint of that folder, the in-memory merge's weights, and a model
    transformers loads with the in-memory merged model's outputs."""
    from transformers import AutoModelForCausalLM

    name, model, ids, targets, folder = case
    trained = surgeon.compile(model, (ids,), lora(targets), {"use_cache": False})
    randomize_adapters(trained.module, seed=7)
    adapter = tmp_path / "adapter"
    trained.save_adapter("a", adapter, format=fmt)
    trained.apply(["merge"])
    want = logits(trained.module, (ids,))
    merged_weights = {f"{s.path}.weight": get_tensor(trained.module, s.weight).detach()
                      for s in trained.adapters["a"].sites}

    before = digests(folder)
    key = "from_peft" if fmt == "peft" else "from_dir"
    compiled = surgeon.compile_pretrained(folder, {"adapters": [{"name": "a", key: str(adapter)}]},
                                          merge_to=tmp_path / "merged")
    assert digests(folder) == before                                        # the folder is only read
    reference = mc.merge_checkpoint(folder, adapter, tmp_path / "reference")
    assert digests(tmp_path / "merged") == digests(tmp_path / "reference")  # bit for bit, every file
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(before)   # shards + index + config
    summary = compiled.merged_checkpoint
    # (merge_checkpoint lists a LoRA site's bias too where the kind may map it: compared with its own list)
    assert sorted(summary.merged) == sorted(reference.merged) and set(merged_weights) <= set(summary.merged)
    out = read_all(tmp_path / "merged")
    for tensor_name, tensor in merged_weights.items():
        assert torch.equal(out[tensor_name], tensor), tensor_name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(loaded, (ids,)), want, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ckpt", "merged", "reference"]


def test_several_adapters_merge_in_sequence_as_the_merge_pass_does(tmp_path):
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    trained = surgeon.compile(model, (ids,), {"adapters": [
        {"name": "a", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
        {"name": "b", "type": "lora", "targets": ["*.q_proj", "*.down_proj"], "rank": 2}]}, {"use_cache": False})
    randomize_adapters(trained.module, seed=3)
    for adapter in ("a", "b"):
        trained.save_adapter(adapter, tmp_path / f"adapter_{adapter}")
    trained.apply(["merge"])
    spec = {"adapters": [{"name": "a", "from_dir": str(tmp_path / "adapter_a")},
                         {"name": "b", "from_dir": str(tmp_path / "adapter_b")}]}
    surgeon.compile_pretrained(tmp_path / "ckpt", spec, merge_to=tmp_path / "merged")
    mc.merge_checkpoint(tmp_path / "ckpt", tmp_path / "adapter_a", tmp_path / "step")
    mc.merge_checkpoint(tmp_path / "step", tmp_path / "adapter_b", tmp_path / "reference")
    assert digests(tmp_path / "merged") == digests(tmp_path / "reference")
    out = read_all(tmp_path / "merged")
    sites = [s for adapter in ("a", "b") for s in trained.adapters[adapter].sites]
    assert len({s.path for s in sites}) == 6   # q_proj carries both adapters
    for site in sites:   # the in-memory merge of both, bit for bit
        assert torch.equal(out[f"{site.path}.weight"], get_tensor(trained.module, site.weight)), site.path
    # the intermediate checkpoint is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_a", "adapter_b", "ckpt", "merged", "reference",
                                                          "step"]


def test_a_checkpoint_without_the_base_prefix_is_merged_under_its_own_names(tmp_path):
    """GPT-2 checkpoints on the hub store `h.0.attn.c_attn.weight` for the module transformer.h.0.attn.c_attn."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model, ids = save_folder(hf_gpt2, tmp_path / "ckpt", "40KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    for file in sorted((tmp_path / "ckpt").glob("*.safetensors")):
        tensors = read_all_file(file)
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    index["weight_map"] = {k.removeprefix("transformer."): v for k, v in index["weight_map"].items()}
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    trained = surgeon.compile(model, (ids,), lora(["*.c_attn"]), {"use_cache": False})
    randomize_adapters(trained.module, seed=5)
    trained.save_adapter("a", tmp_path / "adapter")
    trained.apply(["merge"])
    want = logits(trained.module, (ids,))
    surgeon.compile_pretrained(tmp_path / "ckpt", {"adapters": [{"name": "a", "from_dir": str(tmp_path / "adapter")}]},
                               merge_to=tmp_path / "merged")
    out = read_all(tmp_path / "merged")
    for site in trained.adapters["a"].sites:
        assert torch.equal(out[f"{site.path.removeprefix('transformer.')}.weight"],
                           get_tensor(trained.module, site.weight))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(loaded, (ids,)), want, rtol=1e-5, atol=1e-5)


def read_all_file(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as handle:
        return {k: handle.get_tensor(k).clone() for k in handle.keys()}


# ---------------------------------------------------------------- the command line

def test_cli_hf_model_merge_to_and_out(tmp_path, capsys):
    model, ids = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    trained = surgeon.compile(model, (ids,), lora(["*.q_proj", "*.up_proj"]), {"use_cache": False})
    randomize_adapters(trained.module, seed=11)
    trained.save_adapter("a", tmp_path / "adapter")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"adapters:\n  - {{name: a, from_dir: '{tmp_path / 'adapter'}'}}\n")
    argv = ["compile", "--model", f"hf:{tmp_path / 'ckpt'}", "--spec", str(spec), "--merge-to",
            str(tmp_path / "merged"), "--example-shape", "2x8", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "insert" in printed and "tensors merged" in printed and "skipped (meta weights)" in printed
    assert (tmp_path / "out" / "report.txt").is_file() and (tmp_path / "out" / "adapters" / "a").is_dir()
    mc.merge_checkpoint(tmp_path / "ckpt", tmp_path / "adapter", tmp_path / "reference")
    assert digests(tmp_path / "merged") == digests(tmp_path / "reference")
    # structure only, no --merge-to: the artifacts of a compile
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text("adapters:\n  - {name: a, type: lora, targets: ['*.v_proj'], rank: 2}\n")
    assert main(["compile", "--model", f"hf:{tmp_path / 'ckpt'}", "--spec", str(fresh), "--out",
                 str(tmp_path / "out2")]) == 0
    assert json.loads((tmp_path / "out2" / "adapters" / "a" / "adapter_config.json").read_text())["targets"] == \
        ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("extra, words", [
    (["--merge-to", "m", "--model", "surgeon.models:tiny_llama"], "--merge-to needs --model hf:PATH"),
    (["--model", "hf:", "--out", "o"], "name the checkpoint folder"),
    (["--model", "hf:{ckpt}"], "--out is required"),
    (["--model", "hf:{ckpt}", "--out", "o", "--example-shape", "2by8"], "expected BATCHxLENGTH"),
    (["--model", "hf:{tmp}/nowhere", "--out", "o"], "is not a folder"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, words):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    spec = tmp_path / "spec.yaml"
    spec.write_text("adapters:\n  - {name: a, type: lora, targets: ['*.q_proj'], rank: 2}\n")
    argv = ["compile", "--spec", str(spec), *[w.format(ckpt=tmp_path / "ckpt", tmp=tmp_path) for w in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgeon: error:") and words in err and len(err.strip().splitlines()) == 1, err


def test_cli_generate_refuses_a_checkpoint_folder(tmp_path, capsys):
    assert main(["generate", "--model", f"hf:{tmp_path}", "--spec", str(tmp_path / "spec.yaml")]) == 2
    assert "compiled structure only (meta weights), which cannot generate" in capsys.readouterr().err


# ---------------------------------------------------------------- errors

def test_errors_name_what_and_where_and_leave_the_folder_alone(tmp_path):
    model, _ = save_folder(hf_llama, tmp_path / "ckpt", "100KB")
    folder = tmp_path / "ckpt"
    before = digests(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(surgeon.SurgeonError, match=r"'.*empty' has no config\.json"):
        surgeon.compile_pretrained(tmp_path / "empty", lora(["*.q_proj"]))
    with pytest.raises(surgeon.SurgeonError, match="is not a folder"):
        surgeon.compile_pretrained(tmp_path / "nowhere", lora(["*.q_proj"]))
    for config, words in [({"model_type": "nonesuch_model"}, r"cannot read '.*unknown.config\.json' \(model_type "
                                                               r"'nonesuch_model'"),
                          ({**json.loads((folder / "config.json").read_text()), "architectures": ["NoSuchForCausalLM"]},
                           r"names the architecture 'NoSuchForCausalLM', which transformers .* does not have"),
                          ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": "wide"},
                           r"'.*unknown.config\.json'")]:
        (tmp_path / "unknown").mkdir(exist_ok=True)
        (tmp_path / "unknown" / "config.json").write_text(json.dumps(config))
        with pytest.raises(surgeon.SurgeonError, match=words):
            surgeon.compile_pretrained(tmp_path / "unknown", lora(["*.q_proj"]))
    with pytest.raises(surgeon.SpecError, match=r"target '\*\.qkv' matches no module of LlamaForCausalLM.*"
                                                r"built from '.*ckpt.config\.json'"):
        surgeon.compile_pretrained(folder, lora(["*.qkv"]), merge_to=tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(surgeon.SurgeonError, match="merge_to '.*exists' exists"):
        surgeon.compile_pretrained(folder, lora(["*.q_proj"]), merge_to=tmp_path / "exists")
    with pytest.raises(surgeon.SurgeonError, match="inside the checkpoint folder"):
        surgeon.compile_pretrained(folder, lora(["*.q_proj"]), merge_to=folder / "merged")
    with pytest.raises(surgeon.SurgeonError, match="merge_to needs the folder's safetensors weights.*has neither"):
        surgeon.compile_pretrained(tmp_path / "unknown", lora(["*.q_proj"]), merge_to=tmp_path / "out")
    with pytest.raises(surgeon.SurgeonError, match=r"adapter 'a' \(dora\) has parameters \['lora_magnitude'\] "
                                                   "computed from the base weights' values"):
        surgeon.compile_pretrained(folder, lora(["*.q_proj"], type="dora"), merge_to=tmp_path / "out")
    with pytest.raises(surgeon.SurgeonError, match="cannot be merged"):
        surgeon.compile_pretrained(folder, {"adapters": [{"name": "a", "type": "bottleneck", "targets": ["*.o_proj"]}]},
                                   merge_to=tmp_path / "out")
    assert digests(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty", "exists", "unknown"]


# ---------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path

    import torch, transformers
    from transformers import LlamaForCausalLM   # the model's modules imported before the baseline
    import surgeon

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    folder, adapter, out = map(Path, sys.argv[1:4])
    try:
        Path("/proc/self/clear_refs").write_text("5")   # the peak RSS restarts at the current RSS
    except OSError:
        pass
    start, clock = status("VmRSS"), time.perf_counter()
    compiled = surgeon.compile_pretrained(folder, {"adapters": [{"name": "a", "from_dir": str(adapter)}]},
                                          merge_to=out)
    checked = compiled.merged_checkpoint.verification
    print(json.dumps({"start": start, "peak": status("VmHWM"), "seconds": time.perf_counter() - clock,
                      "merged": len(compiled.merged_checkpoint.merged), "checked": str(checked),
                      "blocks": len(checked.blocks)}))
""")
GRAPH_ALLOWANCE = 128 * 2**20   # the compile of the graph: see the test's docstring


def test_peak_memory_of_merge_to_is_two_largest_tensors_plus_the_graph(tmp_path):
    """A 469 MiB fp32 LLaMA checkpoint (hidden 1024, 8 layers, vocab 16000, 6 shards), LoRA r=16 on all 7
    projections of every layer (a from_dir adapter), merged with merge_to in a fresh process: its peak RSS,
    from right after the imports, grows by less than 2x the largest tensor (the 62.5 MiB embedding: its pages
    mapped while it is read, and its copy) + GRAPH_ALLOWANCE.

    The allowance, 128 MiB: the structure-only compile of the 8-layer graph (torch.export's fake tensors and
    guards, the FX graph and its node metadata, the meta model, the adapter's CPU tensors), measured alone at
    79 MiB on the 2-core VM of docs/large_models.md, with 1.6x headroom for the allocator. The merge's own
    temporaries (a 1024 x 2816 MLP weight, its float64 copy and the float64 delta: ~70 MB) stay below the
    embedding's 2 x 62.5 MiB. Measured there: 163-173 MiB of growth against the bound of 253 MiB, 13-14 s
    for the compile and merge.

    merge_to also checks the merged checkpoint layer by layer (surgeon.layerwise) by default, and this measures
    it: one module's tensors from one checkpoint at a time, the largest the 62.5 MiB embedding (or lm_head), so
    the same bound holds; measured on that VM under load, 122 MiB of growth with verify=False and 173-177 MiB
    with the check, which took 4.7-7.3 s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    model = meta.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100MB")
    sizes = {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}
    largest, total = max(sizes.values()), sum(sizes.values())
    adapter = {}
    for name, tensor in model.named_parameters():
        path = name.removesuffix(".weight")
        if any(path.endswith(t[1:]) for t in LLAMA_TARGETS):
            out_f, in_f = tensor.shape
            adapter[path] = {"lora_A": torch.randn(16, in_f, generator=gen) * 0.01,
                             "lora_B": torch.randn(out_f, 16, generator=gen) * 0.01}
    del model, meta
    from surgeon.adapter_io import save_adapter_dir

    save_adapter_dir(tmp_path / "adapter", "a", "lora", {"rank": 16, "alpha": 32, "use_rslora": False,
                                                         "init": "default"}, adapter, {})
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "adapter"),
                          str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    grew = result["peak"] - result["start"]
    assert result["merged"] == 7 * 8 and result["blocks"] == 8, result["checked"]   # checked layer by layer
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 2 and total > 450 * 10**6
    bound = 2 * largest + GRAPH_ALLOWANCE
    print(f"checkpoint {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB: peak RSS grew by "
          f"{grew / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB) in {result['seconds']:.1f} s")
    assert grew < bound, f"peak RSS grew by {grew / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert bound < total * 0.75   # the bound is well below the checkpoint: the test can fail
