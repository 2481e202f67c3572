"""X-LoRA: LoRA experts mixed per token by a classifier on a scaling pass of the model itself. PEFT parity of the
logits (eval) and of greedy generate with PEFT's XLoraModel built on the same base, with the same expert and
classifier weights; identity insert, training (the classifier only, or the experts too), parameter count, save /
load round trip, merge and mixed batches refused with the reason, activate, remove and re-insert; import and
export of X-LoRA folders in PEFT's layout."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgeon
from surgeon.errors import SurgeonError
from tests.adapters.helpers import (KW, NAME, adapter_nodes, assert_close, assert_identity_insert, assert_param_count,
                                    assert_round_trip, assert_trains, spec)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

LLAMA_TARGETS = ["*.q_proj", "*.down_proj"]
GPT2_TARGETS = ["*.c_attn", "*.c_fc"]
RANKS = [2, 3, 4]   # the experts' ranks (PEFT lets them differ)
ALPHA = 4


def llama():
    return hf_llama(layers=1)   # q_proj 64 -> 64 and down_proj 128 -> 64: two sites, layers 0 and 1


def _experts(model, targets, tmp_path, last_on_first_target: bool = False) -> dict[str, str]:
    """PEFT LoRA folders, one per expert, with random nonzero A and B (init_lora_weights=False).

    PEFT 0.21.2's X-LoRA loader rewrites each expert's keys to `model.model.<...>`, which fits a model that keeps
    its body under `.model` (LLaMA) and no other: GPT-2's `transformer.<...>` keys come back "unexpected". For such
    a model the folders hold no tensors, so PEFT keeps the random factors it injects (init_lora_weights=False),
    and the test copies them across like any other."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    folders = {}
    for i, rank in enumerate(RANKS):
        torch.manual_seed(10 + i)
        names = [t.removeprefix("*.") for t in targets]
        if last_on_first_target and i == len(RANKS) - 1:   # an expert absent from some modules
            names = names[:1]
        config = peft.LoraConfig(target_modules=names, r=rank, lora_alpha=ALPHA, init_lora_weights=False,
                                 use_rslora=i == 1)
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path / str(i))
        if not hasattr(model, "model"):
            save_file({}, str(tmp_path / str(i) / "adapter_model.safetensors"))
        folders[str(i)] = str(tmp_path / str(i))   # PEFT names the experts "0", "1", ... when it loads them
    return folders


def _peft_xlora(model, targets, tmp_path, last_on_first_target: bool = False, **options):
    """PEFT's X-LoRA on a copy of `model`, the classifier moved off its init by seeded noise."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(model)
    base.config.use_cache = False   # XLoraModel refuses a model that caches
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                              adapters=_experts(model, targets, tmp_path, last_on_first_target), **options)
    wrapped = peft.get_peft_model(base, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "internal_xlora_classifier" in name:
                p.add_(torch.randn(p.shape, generator=gen))
    return wrapped


def _surgeon_options(**peft_options) -> dict:
    """The surgeon spec options for a PEFT XLoraConfig's (the same names), with the experts' ranks and scales."""
    scales = [ALPHA / (r ** 0.5 if i == 1 else r) for i, r in enumerate(RANKS)]   # expert 1 uses rsLoRA
    return {"n_experts": len(RANKS), "expert_ranks": RANKS, "expert_scales": scales,
            "xlora_size": 2048, **peft_options}


def _copy_weights(compiled, wrapped) -> None:
    """PEFT's expert factors and classifier layers into the compiled module's parameters."""
    state = compiled.adapters[NAME]
    peft_params = dict(wrapped.named_parameters())
    prefix = "base_model.lora_model.model."
    with torch.no_grad():
        for site in state.sites:
            for pname, target in site.params.items():
                if pname.startswith(("lora_", "trained_lora_")):
                    factor, expert = pname.removeprefix("trained_").rsplit("_", 1)
                    source = peft_params[f"{prefix}{site.path}.{factor}.{expert}.weight"]
                    compiled.module.get_parameter(target).copy_(source)
        linears = [m for m in wrapped.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
        targets = state.sites[0].params
        for k, linear in enumerate(linears):
            compiled.module.get_parameter(targets[f"classifier_{k}_weight"]).copy_(linear.weight)
            compiled.module.get_parameter(targets[f"classifier_{k}_bias"]).copy_(linear.bias)


def _parity(factory, targets, tmp_path, **options):
    model, args = factory()
    wrapped = _peft_xlora(model, targets, tmp_path, **options)
    compiled = surgeon.compile(model, args, spec("xlora", targets, **_surgeon_options(**options)), KW)
    _copy_weights(compiled, wrapped)
    with torch.no_grad():
        expected = wrapped(input_ids=args[0]).logits
    assert not torch.allclose(expected, model(*args, **KW).logits, atol=1e-3)
    assert_close(logits(compiled.module, args), expected)
    if options.get("scaling_pass_value"):   # the scaling pass's own updates matter here
        wrapped.base_model.set_scaling_pass_value(0.0)
        with torch.no_grad():
            assert not torch.allclose(wrapped(input_ids=args[0]).logits, expected, atol=1e-3)
    return model, args, wrapped, compiled


@pytest.mark.parametrize("options", [
    {},
    {"layerwise_scalings": True, "softmax_temperature": 0.5, "top_k_lora": 2, "enable_softmax_topk": True,
     "global_scaling_weight": 0.7},
    {"xlora_depth": 3, "xlora_size": 16, "top_k_lora": 1, "enable_softmax": False, "layerwise_scalings": True},
    {"scaling_pass_value": 0.4, "top_k_lora": 2, "enable_softmax_topk": True},
], ids=["default", "layerwise-temperature-topk-softmax", "depth3-top1-no-softmax", "scaling-pass-value"])
def test_peft_parity_llama(tmp_path, options):
    """PEFT's logits (eval) on tiny LLaMA (GQA) for each routing option."""
    _parity(llama, LLAMA_TARGETS, tmp_path, **options)


def test_peft_parity_gpt2_and_generate(tmp_path):
    """GPT-2's Conv1D sites (flattened rows) give PEFT's logits, and greedy generate gives PEFT's tokens (its
    generate runs with use_cache=False, as surgeon's recompute path for an X-LoRA adapter does)."""
    model, args, wrapped, compiled = _parity(hf_gpt2, GPT2_TARGETS, tmp_path, xlora_depth=2, xlora_size=16)
    with torch.no_grad():
        want = wrapped.generate(input_ids=args[0], max_new_tokens=5, do_sample=False)
    assert torch.equal(compiled.generate(args[0], max_new_tokens=5, do_sample=False), want)


def test_lifecycle(tmp_path):
    """B = 0: an exact identity; the classifier alone trains and is counted once; a round trip through a folder."""
    model, args = llama()
    compiled = surgeon.compile(model, args, spec("xlora", LLAMA_TARGETS, n_experts=3, rank=4, xlora_depth=2,
                                                 xlora_size=16), KW)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, (16 * 64 + 16) + (3 * 16 + 3))   # hidden -> size -> experts, counted once
    assert all(not p.requires_grad for n, p in compiled.module.named_parameters() if ".lora_" in n)
    _pretrained_experts(compiled)   # with B = 0 no classifier can change the output
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)


def test_trainable_experts_and_layerwise_count():
    """use_trainable_adapters: the experts train too; layerwise scalings widen the classifier's last layer."""
    model, args = llama()
    compiled = surgeon.compile(model, args, spec("xlora", LLAMA_TARGETS, n_experts=2, rank=2,
                                                 use_trainable_adapters=True, layerwise_scalings=True), KW)
    sites = 2   # q_proj (64 -> 64) and down_proj (128 -> 64)
    experts = 2 * 2 * ((64 + 64) + (128 + 64))
    assert_param_count(compiled, experts + 64 * 2 * sites + 2 * sites)
    _pretrained_experts(compiled)   # B != 0, so the gradients reach A and the classifier as well
    assert_trains(compiled, args)


def base_graph(model, args):
    """The graph surgeon captures for `model` with no adapter."""
    return surgeon.compile(model, args, {"adapters": [], "pipeline": []}, KW).module.graph


def _pretrained_experts(compiled) -> None:
    """Every expert's B off zero, as experts trained before X-LoRA mixes them are."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in compiled.module.named_parameters():
            if "lora_B_" in name:
                p.normal_(0, 0.1, generator=gen)


def test_merge_and_mixed_batch_refused_activate_remove(tmp_path):
    """Merge and mixed batches are refused, saying why; parking the adapter (activate) and taking it back give the
    base and the adapted outputs bit for bit; remove gives back the base graph and its outputs, and the adapter
    inserts again."""
    model, args = llama()
    compiled = surgeon.compile(model, args, spec("xlora", LLAMA_TARGETS, xlora_size=16, xlora_depth=2,
                                                 scaling_pass_value=0.5), KW)   # the pass has updates to undo
    base = logits(compiled.module, args)
    inserted = len(compiled.module.graph.nodes)
    with pytest.raises(SurgeonError, match="per token"):
        compiled.apply(["merge"])
    _pretrained_experts(compiled)
    adapted = logits(compiled.module, args)
    assert not torch.allclose(adapted, base)
    with pytest.raises(SurgeonError, match="per token"):
        compiled.generate(args[0], adapter_names=[NAME, "__base__"], max_new_tokens=2)
    compiled.apply([{"activate": {"adapters": []}}])
    assert adapter_nodes(compiled.module) == []
    assert torch.equal(logits(compiled.module, args), base)
    compiled.apply([{"activate": {"adapters": [NAME]}}])
    assert len(compiled.module.graph.nodes) == inserted
    assert torch.equal(logits(compiled.module, args), adapted)
    compiled.apply(["remove"])
    assert adapter_nodes(compiled.module) == []
    assert not [n for n, _ in compiled.module.named_parameters() if f"adapter_{NAME}" in n]
    assert str(compiled.module.graph) == str(base_graph(model, args))
    assert torch.equal(logits(compiled.module, args), base)
    compiled.apply(["insert"])
    assert len(compiled.module.graph.nodes) == inserted
    assert torch.equal(logits(compiled.module, args), base)   # a fresh insert: B = 0 again


def _write_xlora_folder(wrapped, folder) -> None:
    """An X-LoRA folder in the layout XLoraConfig documents, from PEFT's model in memory: the experts' LoRA folders
    (already saved, named in `adapters`), the config, and every classifier layer under PEFT's key (PEFT 0.21.2's
    own save drops the keys that contain '.<expert name>.', here `layers.0`)."""
    from safetensors.torch import save_file

    config = wrapped.peft_config["default"].to_dict()
    folder.mkdir()
    for name, path in config["adapters"].items():   # inside the folder, where PEFT's save puts them
        shutil.copytree(path, folder / name)
    (folder / "adapter_config.json").write_text(json.dumps(config, default=str))
    classifier = {f"base_model.{name}": p.detach().clone() for name, p in wrapped.base_model.named_parameters()
                  if name.startswith("internal_xlora_classifier.")}
    save_file(classifier, str(folder / "adapter_model.safetensors"))


def test_peft_folder_import_and_export(tmp_path):
    """An X-LoRA folder (an expert absent from down_proj, one with rsLoRA, depth 2 with dropout) imports with PEFT's
    logits; exported back, PEFT's XLoraModel loads it with the same logits. A folder missing the classifier's
    first layer, as PEFT's own save writes it, is refused naming the key and why, and so is an expert folder
    outside the X-LoRA folder."""
    model, args = llama()
    wrapped = _peft_xlora(model, LLAMA_TARGETS, tmp_path, last_on_first_target=True, xlora_depth=2, xlora_size=16,
                          layerwise_scalings=True)
    with torch.no_grad():
        expected = wrapped(input_ids=args[0]).logits
    _write_xlora_folder(wrapped, tmp_path / "xlora")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "xlora")}]}, KW)
    ranks = {s.path.rsplit(".", 1)[-1]: s.options["expert_ranks"] for s in compiled.adapters[NAME].sites}
    assert ranks == {"q_proj": RANKS, "down_proj": [*RANKS[:-1], 0]}
    assert_close(logits(compiled.module, args), expected)
    compiled.save_adapter(NAME, tmp_path / "exported", format="peft")
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(model)
    base.config.use_cache = False
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "exported").eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=args[0]).logits, expected)
    flat = load_file(str(tmp_path / "xlora" / "adapter_model.safetensors"))
    as_peft_saves = {k: v for k, v in flat.items() if ".layers.0." not in k}
    save_file(as_peft_saves, str(tmp_path / "xlora" / "adapter_model.safetensors"))
    with pytest.raises(surgeon.SpecError, match=r"layers\.0\.weight.*expert '0'"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "xlora")}]}, KW)
    shutil.rmtree(tmp_path / "xlora" / "1")   # the config's path for expert '1' lies outside the folder
    with pytest.raises(surgeon.SpecError, match="outside the X-LoRA folder"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "xlora")}]}, KW)


def test_inserted_after_another_adapter_is_refused():
    """The scaling pass copies the base graph: another adapter's nodes on its way are refused, saying what to do."""
    model, args = llama()
    adapters = [{"name": "first", "type": "lora", "targets": ["*.v_proj"]},
                {"name": NAME, "type": "xlora", "targets": LLAMA_TARGETS, "xlora_size": 16}]
    with pytest.raises(SurgeonError, match="belongs to adapter 'first'.*before other adapters"):
        surgeon.compile(model, args, {"adapters": adapters, "pipeline": ["insert"]}, KW)
