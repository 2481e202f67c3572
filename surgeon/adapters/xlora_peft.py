"""X-LoRA folders in PEFT's layout: read (`from_peft`) and write (export) an `xlora` adapter.

The layout XLoraConfig documents: adapter_config.json (peft_type XLORA, the classifier's options and `adapters`,
expert name -> LoRA checkpoint, in expert order), each expert a PEFT LoRA folder (read here from the subfolder
named by the expert, as PEFT's save puts them, else from the path the config gives), and adapter_model.safetensors
holding the classifier: `base_model.internal_xlora_classifier.layers.<i>.weight` / `.bias`, i its index in PEFT's
nn.Sequential (Linear, ReLU and, when xlora_dropout_p > 0, Dropout per hidden layer, then the last Linear).

Each expert's factors become the site's `lora_A_<i>` / `lora_B_<i>` (`trained_` in front with
use_trainable_adapters); a module an expert does not adapt gets rank 0 there (`expert_ranks`), and each expert's
scale alpha / r (alpha / sqrt(r) with rsLoRA, per module through rank_pattern / alpha_pattern) is `expert_scales`.
PEFT 0.21.2's own X-LoRA save does not write this layout faithfully: it drops every classifier key that contains
".<expert name>." (with experts named "0", "1", ... the classifier's first layer, `layers.0`) and fills the expert
subfolders with whatever keys contain the expert's name; a folder missing classifier keys is refused, naming them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import SpecError
from .lora import lora_scale
from .xlora import expert_scales, factor_names

PEFT_TYPE = "XLORA"

PREFIX = "base_model.internal_xlora_classifier.layers."
OPTIONS = ("xlora_depth", "xlora_size", "xlora_dropout_p", "layerwise_scalings", "enable_softmax",
           "softmax_temperature", "top_k_lora", "enable_softmax_topk", "global_scaling_weight",
           "use_trainable_adapters", "scaling_pass_value")
DEFAULTS = {"xlora_depth": 1, "xlora_size": 2048, "xlora_dropout_p": 0.2, "layerwise_scalings": False,
            "enable_softmax": True, "softmax_temperature": 1.0, "top_k_lora": None, "enable_softmax_topk": False,
            "global_scaling_weight": 1.0, "use_trainable_adapters": False, "scaling_pass_value": 0.0}   # XLoraConfig's


def _fail(directory: Path, message: str) -> SpecError:
    return SpecError("<adapter>", f"'{directory}': {message}")


def classifier_keys(options: dict) -> list[tuple[str, str]]:
    """(PEFT key stem, surgeon stem) of each classifier Linear: PEFT numbers the nn.Sequential's modules."""
    depth = options["xlora_depth"]
    step = 3 if options["xlora_dropout_p"] > 0 else 2   # Linear, ReLU (, Dropout) per hidden layer
    return [(f"{PREFIX}{k * step}", f"classifier_{k}") for k in range(depth)]


def _expert_folder(directory: Path, name: str, path) -> Path:
    """The expert's LoRA folder: the subfolder named by the expert (PEFT's save), else the config's path; either
    must lie inside the X-LoRA folder (a checkpoint names no file outside itself)."""
    inside = directory.resolve()
    for candidate in (directory / name, *((Path(str(path)), directory / str(path)) if path else ())):
        if not (candidate / "adapter_config.json").is_file():
            continue
        if not candidate.resolve().is_relative_to(inside):
            raise _fail(directory, f"expert '{name}' points at '{candidate}', outside the X-LoRA folder; put each "
                                   "expert's LoRA folder in a subfolder named by the expert, as PEFT saves it")
        return candidate
    raise _fail(directory, f"expert '{name}' has no LoRA folder: neither '{directory / name}' nor '{path}' holds "
                           "an adapter_config.json")


def _expert(directory: Path, name: str, path, load_lora: Callable):
    """One expert's LoadedAdapter (a plain LoRA: what PEFT's X-LoRA layer computes)."""
    loaded = load_lora(_expert_folder(directory, name, path))
    entry = loaded.entry
    if entry["type"] != "lora" or entry.get("bias") or entry.get("init") not in ("default", None):
        raise _fail(directory, f"expert '{name}' is a {entry['type']} adapter (init {entry.get('init')}, lora_bias "
                               f"{bool(entry.get('bias'))}); X-LoRA mixes plain LoRA experts (PEFT refuses DoRA)")
    return loaded


def read_xlora_dir(directory: Path, config: dict, flat: dict[str, torch.Tensor], load_lora: Callable):
    """(spec entry, weights by module, site options) of an X-LoRA folder (see the module docstring): `flat` is its
    adapter_model.safetensors, `load_lora` reads one expert's PEFT LoRA folder (surgeon.adapter_io.load_peft_dir)."""
    names = config.get("adapters")
    if not isinstance(names, dict) or not names:
        raise _fail(directory, "adapter_config.json: `adapters` must map each expert's name to its LoRA folder")
    options = {key: config.get(key, DEFAULTS[key]) for key in OPTIONS}
    experts = [_expert(directory, str(name), path, load_lora) for name, path in names.items()]
    paths = sorted({path for expert in experts for path in expert.weights})
    classifier = _classifier(directory, options, flat, list(names))
    weights: dict[str, dict[str, torch.Tensor]] = {path: dict(classifier) for path in paths}
    site_options: dict[str, dict] = {}
    for path in paths:
        ranks, scales = [], []
        for i, expert in enumerate(experts):
            params = expert.weights.get(path)
            if params is None:   # this expert leaves the module alone; its index still counts
                ranks.append(0)
                scales.append(0.0)
                continue
            A, B = factor_names(i, options)
            weights[path].update({A: params["lora_A"], B: params["lora_B"]})
            opts = {**expert.entry, **expert.site_options.get(path, {})}
            ranks.append(int(params["lora_A"].shape[0]))
            scales.append(lora_scale({"rank": ranks[-1], "alpha": opts.get("alpha"),
                                      "use_rslora": opts.get("use_rslora", False)}))
        site_options[path] = {"expert_ranks": ranks, "expert_scales": scales}
    entry = {"type": "xlora", "targets": paths, "n_experts": len(experts),
             "rank": max(max(o["expert_ranks"]) for o in site_options.values()),
             "expert_dropout": [float(e.entry.get("dropout", 0.0)) for e in experts], **options}
    return entry, weights, site_options


def _classifier(directory: Path, options: dict, flat: dict[str, torch.Tensor], experts: list[str]) -> dict:
    """{classifier_<k>_weight / _bias: tensor} from PEFT's keys; a missing or unexpected key is refused."""
    found, wanted = {}, set()
    for peft_stem, stem in classifier_keys(options):
        for part in ("weight", "bias"):
            key = f"{peft_stem}.{part}"
            wanted.add(key)
            if key not in flat:
                dropped = [name for name in experts if f".{name}." in key]
                why = (f" (PEFT 0.21.2's X-LoRA save drops the classifier keys that contain '.<expert name>.', here "
                       f"expert {dropped[0]!r}; rename the experts or write the classifier's keys in full)"
                       if dropped else "")
                raise _fail(directory, f"adapter_model.safetensors lacks the classifier tensor '{key}'{why}")
            found[f"{stem}_{part}"] = flat[key]
    extra = sorted(set(flat) - wanted)
    if extra:
        raise _fail(directory, f"unexpected tensors {extra} beside the X-LoRA classifier's {sorted(wanted)} "
                               f"(xlora_depth {options['xlora_depth']}, xlora_dropout_p {options['xlora_dropout_p']})")
    return found


def write_xlora_dir(directory: Path, options: dict, weights: dict[str, dict[str, torch.Tensor]],
                    site_options: dict[str, dict], transposed_paths: set[str], save_lora: Callable) -> None:
    """An X-LoRA folder PEFT's XLoraModel loads: one LoRA subfolder per expert ("0", "1", ...), written by
    `save_lora` (surgeon.adapter_io.save_peft_dir), the config, and the classifier's tensors under PEFT's keys."""
    directory = Path(directory)
    experts = {}
    for i in range(options["n_experts"]):
        A, B = factor_names(i, options)
        held = {path: params for path, params in weights.items() if A in params}
        ranks = {path: int(held[path][A].shape[0]) for path in held}
        # c = alpha / r: PEFT's plain LoRA scale, so alpha = c r (rsLoRA is not needed to hold any scale)
        per_site = {path: {"rank": ranks[path],
                           "alpha": expert_scales({**options, **site_options.get(path, {})})[i] * ranks[path]}
                    for path in held}
        lora = {path: {"lora_A": params[A], "lora_B": params[B]} for path, params in held.items()}
        rank = max(ranks.values())
        base = {"rank": rank, "alpha": next((o["alpha"] for o in per_site.values() if o["rank"] == rank), rank),
                "use_rslora": False, "init": "default", "dropout": 0.0}
        save_lora(directory / str(i), base, lora, transposed_paths & set(held), kind="lora",
                      site_options={p: {k: v for k, v in o.items() if v != base[k]} for p, o in per_site.items()})
        experts[str(i)] = str(directory / str(i))
    first = next(iter(weights.values()))
    flat = {f"{peft_stem}.{part}": first[f"{stem}_{part}"].detach().contiguous().cpu()
            for peft_stem, stem in classifier_keys(options) for part in ("weight", "bias")}
    save_file(flat, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "adapters": experts,
              "hidden_size": int(first["classifier_0_weight"].shape[1]), **{key: options[key] for key in OPTIONS}}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
