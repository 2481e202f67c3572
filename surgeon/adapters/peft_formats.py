"""PEFT checkpoint layouts: one reader and one writer per `peft_type`.

A reader turns PEFT's adapter_config.json and the per-module tensors (already renamed to
surgeon's parameter names) into a spec entry and per-module option overrides; a writer does
the reverse for export. surgeon.adapter_io.load_peft_dir / save_peft_dir do the file work
around them. Where PEFT's tensor shape differs from surgeon's (IA3's (n, 1) / (1, n) scales,
BOFT's (out, 1) scale, LoRA's 4-D conv factors, read as r x (in * kh * kw) and out x r), the
reader and writer reshape; values are never changed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SpecError
from .lora import BASE_INITS


@dataclass(frozen=True)
class PeftFormat:
    peft_type: str
    kinds: tuple[str, ...]                 # the surgeon kinds this format holds
    names: dict[str, str]                  # surgeon parameter name -> PEFT key under the module
    read: Callable[[dict, dict, dict], tuple[dict, dict]]   # config, weights, extras -> entry, site options
    write: Callable[[str, dict, dict, dict], tuple[dict, dict]]   # kind, options, weights, site options
    #                                                                -> config, model-level tensors
    config_keys: tuple[str, ...] = ("bias", "fan_in_fan_out")     # of those common keys, the ones PEFT's
    #                                                                config class for this type has
    model_level: tuple[str, ...] = ()                             # tensors saved as <model_prefix><name>
    model_prefix: str = "base_model."                             # "" for prompt learning's prompt_embeddings


def _fail(message: str) -> SpecError:
    return SpecError("<adapter>", message)


def _matches(pattern: str, path: str, what: str, whole: bool = False) -> bool:
    """re.fullmatch (whole) or PEFT's pattern-key match of a config's regex; a bad regex is a SpecError."""
    try:
        return bool(re.fullmatch(pattern, path) if whole else re.match(rf"(.*\.)?({pattern})$", path))
    except re.error as error:
        raise _fail(f"adapter_config.json: {what} {pattern!r} is not a valid regular expression: {error}") from error


def pattern_key(config: dict, name: str, path: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key of config[name] that matches the path's end."""
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict):
        raise _fail(f"adapter_config.json: {name} must be an object of regex -> value, got {patterns!r}")
    return next((key for key in patterns if _matches(key, path, f"{name} key")), None)


def peft_pattern(config: dict, name: str, path: str, default):
    """config[name]'s value for the path (rank_pattern, alpha_pattern), else default."""
    key = pattern_key(config, name, path)
    return default if key is None else config[name][key]


def _dropout(config: dict, key: str) -> float:
    """A dropout probability from the config (absent: 0.0), checked to be a number in [0, 1]."""
    value = config.get(key) or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise _fail(f"adapter_config.json: '{key}' must be a number in [0, 1], got {config.get(key)!r}")
    return float(value)


def _no_dropout(config: dict, kind: str, *keys: str) -> None:
    """Refuse a dropout surgeon does not implement for this kind (it acts only in training)."""
    for key in keys:
        if _dropout(config, key):
            raise _fail(f"adapter_config.json: {key}={config[key]!r} is not supported for a '{kind}' adapter "
                        "(surgeon implements dropout for lora, dora, vera and lora-xs); it acts only in training, "
                        f"so setting {key} to 0 loads the same inference function")


def _number(config: dict, *keys: str) -> None:
    for key in keys:
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _fail(f"adapter_config.json: '{key}' must be a finite number, got {value!r}")


def _positive_int(where: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(f"adapter_config.json: {where} must be a positive integer, got {value!r}")
    return value


def _rank(config: dict, path: str, params: dict, shown: dict[str, int]) -> int:
    """The module's rank, r or its rank_pattern entry, checked against every tensor in `shown`
    (parameter name -> the axis that holds the rank) the module has."""
    key = pattern_key(config, "rank_pattern", path)
    where = "r" if key is None else f"rank_pattern[{key!r}]"
    rank = _positive_int(where, config["r"] if key is None else config["rank_pattern"][key])
    for name, axis in shown.items():
        tensor = params.get(name)
        if tensor is not None and (tensor.dim() <= axis or tensor.shape[axis] != rank):
            raise _fail(f"adapter_config.json: {where}={rank} disagrees with the tensors: module '{path}' has "
                        f"{name} of shape {list(tensor.shape)}")
    return rank


def _overrides(weights: dict, site: Callable[[str, dict], dict], entry: dict) -> dict:
    """Per-module options that differ from the adapter-wide ones."""
    out = {}
    for path, params in weights.items():
        differs = {k: v for k, v in site(path, params).items() if v != entry.get(k)}
        if differs:
            out[path] = differs
    return out


def _rank_alpha(config: dict, weights: dict, shown: dict[str, int], alpha_key: str):
    """Entry rank/alpha and per-module overrides from PEFT's r, alpha and patterns; each module's
    tensors in `shown` (name -> axis) must have the rank the config gives it."""
    _number(config, alpha_key)
    entry = {"rank": _positive_int("r", config.get("r")), "alpha": float(config[alpha_key])}

    def site(path: str, params: dict) -> dict:
        alpha = peft_pattern(config, "alpha_pattern", path, config[alpha_key])
        _number({"alpha_pattern": alpha}, "alpha_pattern")
        return {"rank": _rank(config, path, params, shown), "alpha": float(alpha)}
    return entry, _overrides(weights, site, entry)


def _write_rank_alpha(options: dict, weights: dict, site_options: dict, alpha_key: str,
                      rank_of: Callable[[dict], int] | None = None, experts: dict | None = None) -> dict:
    """r, alpha and PEFT's rank/alpha patterns (per-module ranks read from the tensors when given)."""
    def alpha(opts: dict):
        return opts["alpha"] if opts["alpha"] is not None else opts["rank"]
    sites = {path: {**options, **site_options.get(path, {})} for path in weights}
    if rank_of is not None:
        # a parameter LoRA holds every expert's rank-r rows (experts: path -> E)
        sites = {path: {**opts, "rank": rank_of(weights[path]) // (experts or {}).get(path, 1)}
                 for path, opts in sites.items()}
    return {"r": options["rank"], alpha_key: alpha(options),
            "rank_pattern": {p: o["rank"] for p, o in sites.items() if o["rank"] != options["rank"]},
            "alpha_pattern": {p: alpha(o) for p, o in sites.items() if alpha(o) != alpha(options)}}


# ---------------------------------------------------------------- LoRA, DoRA, PiSSA

# leave W alone (EVA too: its A is in the checkpoint, so it reads and writes as init_lora_weights True), or
# PiSSA / OLoRA / CorDA (the residual W - s B0 A0) / LoftQ (the quantized Q), recomputed from W
LORA_INITS = (True, False, "gaussian", "pissa", "olora", "eva", "orthogonal", "loftq", "corda")


def _loftq_options(config: dict) -> dict:
    """loftq_config's bits and iterations as surgeon's loftq_bits / loftq_iter options."""
    loftq = config.get("loftq_config")
    if not isinstance(loftq, dict) or not loftq:
        raise _fail(f"adapter_config.json: init_lora_weights 'loftq' needs a loftq_config object, got {loftq!r}")
    bits, iterations = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
    if bits not in (4, 8):
        raise _fail(f"adapter_config.json: loftq_config.loftq_bits must be 4 or 8, got {bits!r}")
    return {"loftq_bits": bits, "loftq_iter": _positive_int("loftq_config.loftq_iter", iterations)}


def _read_lora(config, weights, extras):
    init = config.get("init_lora_weights", True)
    if init == "lora_ga":   # PEFT's residual came from random draws on data the checkpoint does not hold
        raise _fail("init_lora_weights='lora_ga': PEFT trained this adapter on a base holding W - s B0 A0, with B0 "
                    "and A0 from a randomized SVD (torch.svd_lowrank, random draws) of the loss gradient on its "
                    "training data; neither the gradient nor those draws are in the checkpoint, so that base cannot "
                    "be rebuilt (PEFT itself loads it onto the unchanged W). Convert it in PEFT to a plain LoRA "
                    "first: save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>)")
    if init not in LORA_INITS:
        raise _fail(f"init_lora_weights={init!r} changes the base weights in a way surgeon does not reproduce "
                    f"(supported: {list(LORA_INITS)}; PiSSA only with the full SVD)")
    residual = init if init in BASE_INITS else None   # the base holds W - s B0 A0 or Q, recomputed from W
    kind = "dora" if config.get("use_dora") else "lora"
    if kind == "dora" and residual:
        raise _fail(f"DoRA with a {residual} init is not supported")
    bias = bool(config.get("lora_bias", False))   # lora_B's bias (PEFT's lora_bias): surgeon's lora `bias` option
    if bias and kind == "dora":
        raise _fail("lora_bias with DoRA is not supported (PEFT refuses it too)")
    for path, params in weights.items():
        if ("lora_bias" in params) != bias:
            raise _fail(f"module '{path}' {'has' if 'lora_bias' in params else 'lacks'} a lora_B.bias, but the config "
                        f"says lora_bias={bias}")
    convs = {path for path, params in weights.items() if _conv_lora(params)}
    experts = _parameter_loras(config, weights)
    for path, params in weights.items():
        if path in convs:   # A r x in x k..., B a 1x1 conv: out x r (out x r / groups on a grouped conv)
            params.update(lora_A=params["lora_A"].flatten(1), lora_B=params["lora_B"].flatten(1))
        if not {"lora_A", "lora_B"} <= set(params) or params["lora_A"].dim() != 2:
            raise _fail(f"module '{path}' needs 2-D lora_A and lora_B weights (3- to 5-D, with a 1x1 lora_B, "
                        "on a conv)")
    entry, sites = _rank_alpha(config, {p: w for p, w in weights.items() if p not in convs | set(experts)},
                               {"lora_A": 0, "lora_B": 1}, "lora_alpha")
    sites.update(_expert_sites(config, weights, experts, entry))
    _, conv_sites = _rank_alpha(config, {p: w for p, w in weights.items() if p in convs},
                                {"lora_A": 0}, "lora_alpha")
    sites.update(conv_sites)
    _check_conv_b(weights, convs, entry, sites)
    entry.update(type=kind, use_rslora=bool(config.get("use_rslora", False)),
                 init=residual or "default", dropout=_dropout(config, "lora_dropout"))
    if residual == "loftq":
        entry.update(_loftq_options(config))
    if residual == "corda":
        method = (config.get("corda_config") or {}).get("corda_method", "ipm")
        if method not in ("ipm", "kpm"):
            raise _fail(f"adapter_config.json: corda_config.corda_method must be 'ipm' or 'kpm', got {method!r}")
        entry["corda_mode"] = method
    if bias:
        entry["bias"] = True
    if experts:   # targets name the parameters; insert keys the nested entries by them (adapter_ops.place_peft_params)
        entry["targets"] = sorted({*(p for p in weights if p not in experts), *(t for ts in experts.values() for t in ts)})
    return entry, sites


def _parameter_loras(config: dict, weights: dict) -> dict[str, list[str]]:
    """PEFT module key -> the parameter names (`<module>.<param>`) its `target_parameters` could mean.

    PEFT saves the LoRA of a targeted parameter under the parameter's module, one `.base_layer`
    deeper per wrapper around it (several parameters of one module nest); a key is such an entry
    when its module and a target_parameters entry's last name form a name PEFT's rule matches
    (equal, or ending in "." + the entry)."""
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _fail(f"adapter_config.json: target_parameters must be a list of names, got {targets!r}")
    out = {}
    for key in weights if targets else ():
        module = re.sub(r"(\.base_layer)+$", "", key)
        candidates = {f"{module}.{t.rpartition('.')[2]}": t for t in targets}
        names = sorted(name for name, t in candidates.items() if name == t or name.endswith("." + t))
        if names:
            out[key] = names
        elif module != key:
            raise _fail(f"module '{key}' is a nested PEFT wrapper, but target_parameters {targets} name no "
                        f"parameter of '{module}'")
    return out


def _expert_sites(config: dict, weights: dict, experts: dict, entry: dict) -> dict:
    """Per-entry rank/alpha overrides of parameter LoRAs: A is (r E) x in, B out x (r E), so the
    rank divides A's rows; PEFT's patterns match the parameter's name, which a nested entry does
    not give before capture, so its candidate parameters must agree."""
    sites = {}
    for key, names in experts.items():
        A, B = weights[key].get("lora_A"), weights[key].get("lora_B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise _fail(f"parameter LoRA '{key}' needs lora_A of (r * experts) x in and lora_B of out x "
                        f"(r * experts), got {None if A is None else list(A.shape)} and "
                        f"{None if B is None else list(B.shape)}")
        options = {(_rank(config, name, {}, {}), float(peft_pattern(config, "alpha_pattern", name,
                                                                    config["lora_alpha"]))) for name in names}
        if len(options) != 1:
            raise _fail(f"rank_pattern / alpha_pattern give the parameters {names} different values; their "
                        f"LoRAs are nested under '{key}' and cannot be told apart before capture")
        rank, alpha = options.pop()
        if A.shape[0] % rank:
            raise _fail(f"adapter_config.json: rank {rank} does not divide lora_A's {A.shape[0]} rows "
                        f"(r * experts) of '{key}'")
        differs = {k: v for k, v in {"rank": rank, "alpha": alpha}.items() if v != entry.get(k)}
        if differs:
            sites[key] = differs
    return sites


def _conv_lora(params: dict) -> bool:
    """A conv module's LoRA: lora_A with the conv's kernel, lora_B a 1x1 conv of the same dimensionality."""
    A, B = params.get("lora_A"), params.get("lora_B")
    return A is not None and B is not None and 3 <= A.dim() <= 5 and B.dim() == A.dim() \
        and all(size == 1 for size in B.shape[2:])


def _check_conv_b(weights: dict, convs: set, entry: dict, sites: dict) -> None:
    """A conv's lora_B reads r / groups rank channels: PEFT makes it a grouped 1x1 conv on a grouped
    conv. Its width must divide the rank; insertion checks the group count against the site's."""
    for path in convs:
        rank, width = sites.get(path, {}).get("rank", entry["rank"]), weights[path]["lora_B"].shape[1]
        if rank % width:
            raise _fail(f"module '{path}': lora_B of shape {list(weights[path]['lora_B'].shape)} does not split "
                        f"rank {rank} into equal groups")


def _write_lora(kind, options, weights, site_options):
    if options.get("init") == "lora_ga":
        raise _fail("a lora_ga adapter's base is the residual W - s B0 A0, and PEFT loads a lora_ga checkpoint onto "
                    "the unchanged W (it has no gradients then), so the export would not compute this model: save "
                    "it in surgeon's format (from_dir recomputes the residual from the same example inputs), or "
                    "merge it")
    experts = {path: site_options[path]["experts"] for path in weights if "experts" in site_options.get(path, {})}
    ranks = _write_rank_alpha(options, weights, site_options, "lora_alpha",
                              lambda params: params["lora_A"].shape[0], experts)
    config = {**ranks, "use_rslora": options["use_rslora"], "lora_bias": bool(options.get("bias", False)),
              "lora_dropout": options.get("dropout", 0.0), "use_dora": kind == "dora",
              "init_lora_weights": options["init"] if options.get("init") in BASE_INITS else True}
    if options.get("init") == "loftq":   # PEFT re-runs LoftQ on the full-precision base when it loads this
        config["loftq_config"] = {"loftq_bits": options["loftq_bits"], "loftq_iter": options["loftq_iter"]}
    if options.get("init") == "corda":
        config["corda_config"] = {"corda_method": options["corda_mode"]}
    if experts:
        config.update(target_modules=sorted(p for p in weights if p not in experts), target_parameters=sorted(experts))
        _nest_parameter_loras(weights, list(experts))
    return config, {}


def _nest_parameter_loras(weights: dict, params: list[str]) -> None:
    """Re-key parameter LoRAs the way PEFT saves them: under the parameter's module, with one
    `.base_layer` per later-registered targeted parameter of that module (its wrappers nest in
    registration order; `params` comes in graph order, which follows it)."""
    by_module: dict[str, list[str]] = {}
    for path in params:
        by_module.setdefault(path.rpartition(".")[0], []).append(path)
    for module, paths in by_module.items():
        for i, path in enumerate(paths):
            weights[module + ".base_layer" * (len(paths) - 1 - i)] = weights.pop(path)


# ---------------------------------------------------------------- (IA)^3

def _feedforward(config: dict, path: str) -> bool:
    """PEFT's rule: a regex string must match the whole path, a list entry must end it."""
    modules = config.get("feedforward_modules") or []
    if isinstance(modules, str):
        return _matches(modules, path, "feedforward_modules", whole=True)
    return any(path.endswith(name) for name in modules)


def _read_ia3(config, weights, extras):
    for path, params in weights.items():
        on = "input" if _feedforward(config, path) else "output"
        scale = params["ia3_l"]
        if scale.dim() != 2 or scale.shape[0 if on == "input" else 1] != 1:
            raise _fail(f"module '{path}': ia3_l of shape {list(scale.shape)} does not fit an {on} scale")
        params["ia3_l"] = scale.reshape(-1)
    entry = {"type": "ia3", "on": "output"}
    return entry, _overrides(weights, lambda path, params: {"on": "input" if _feedforward(config, path)
                                                            else "output"}, entry)


def _write_ia3(kind, options, weights, site_options):
    inputs = sorted(p for p in weights if {**options, **site_options.get(p, {})}["on"] == "input")
    for path, params in weights.items():
        params["ia3_l"] = params["ia3_l"].reshape((1, -1) if path in inputs else (-1, 1))
    return {"feedforward_modules": inputs, "init_ia3_weights": True}, {}


# ---------------------------------------------------------------- LoHa, LoKr

def _read_loha(config, weights, extras):
    _no_dropout(config, "loha", "rank_dropout", "module_dropout")
    shown = {"hada_w1_a": 1, "hada_w1_b": 0, "hada_w2_a": 1, "hada_w2_b": 0}
    entry, sites = _rank_alpha(config, weights, shown, "alpha")
    return {**entry, "type": "loha"}, sites


def _read_lokr(config, weights, extras):
    _no_dropout(config, "lokr", "rank_dropout", "module_dropout")
    shown = {"lokr_w1_a": 1, "lokr_w1_b": 0, "lokr_w2_a": 1, "lokr_w2_b": 0}   # full factors show no rank
    entry, sites = _rank_alpha(config, weights, shown, "alpha")
    entry.update(type="lokr", decompose_both=bool(config.get("decompose_both", False)),
                 decompose_factor=int(config.get("decompose_factor", -1)))
    return entry, sites


def _write_lycoris(kind, options, weights, site_options):
    config = {**_write_rank_alpha(options, weights, site_options, "alpha"), "rank_dropout": 0.0,
              "module_dropout": 0.0, "init_weights": True}
    if kind == "lokr":
        config.update(decompose_both=options["decompose_both"], decompose_factor=options["decompose_factor"])
    return config, {}


# ---------------------------------------------------------------- VeRA

def _read_vera(config, weights, extras):
    if not config.get("save_projection", True) or "vera_A" not in extras or "vera_B" not in extras:
        raise _fail("the checkpoint does not hold vera_A / vera_B (save_projection=False); surgeon cannot "
                    "regenerate PEFT's projections")
    config = {**config, "r": config.get("r", 256)}
    rank = _positive_int("r", config["r"])
    for name, axis in (("vera_A", 0), ("vera_B", 1)):
        if extras[name].dim() != 2 or extras[name].shape[axis] != rank:
            raise _fail(f"adapter_config.json: r={rank} disagrees with the tensors: the shared {name} has shape "
                        f"{list(extras[name].shape)}")
    for path, params in weights.items():
        _rank(config, path, params, {"vera_lambda_d": 0})
        params.update(vera_A=extras["vera_A"], vera_B=extras["vera_B"])
    entry = {"type": "vera", "rank": rank, "d_initial": float(config.get("d_initial", 0.1)),
             "dropout": _dropout(config, "vera_dropout")}
    return entry, {}


def _write_vera(kind, options, weights, site_options):
    """PEFT keeps one A and B sized for the largest site; every site's must be its leading part."""
    biggest = {name: max((params[name] for params in weights.values()), key=lambda t: t.numel())
               for name in ("vera_A", "vera_B")}
    for path, params in weights.items():
        rank, in_features = params["vera_A"].shape
        out_features = params["vera_B"].shape[0]
        if not (torch.equal(biggest["vera_A"][:rank, :in_features], params["vera_A"])
                and torch.equal(biggest["vera_B"][:out_features, :rank], params["vera_B"])):
            raise _fail(f"VeRA module '{path}' has projections that are not slices of the largest ones; PEFT "
                        "needs one shared pair (sites of different shapes initialized by surgeon are independent)")
        del params["vera_A"], params["vera_B"]
    config = {"r": options["rank"], "d_initial": options["d_initial"], "save_projection": True,
              "projection_prng_key": options["projection_seed"], "vera_dropout": options.get("dropout", 0.0)}
    return config, {"vera_A": biggest["vera_A"], "vera_B": biggest["vera_B"]}


def _read_pvera(config, weights, extras):
    """Per module pvera_lambda_d (2r) and pvera_lambda_b (out); one pvera_A (2r x in) and pvera_B (out x r)
    at the model level, sized for the largest target (sites read their leading part), as VeRA's."""
    if config.get("sample_at_inference"):
        raise _fail("sample_at_inference=True samples in eval mode too: the adapter has no deterministic function "
                    "to compile, verify or merge; set it to false to load PVeRA's inference path (the mean)")
    if not config.get("save_projection", True) or "pvera_A" not in extras or "pvera_B" not in extras:
        raise _fail("the checkpoint does not hold pvera_A / pvera_B (save_projection=False); surgeon cannot "
                    "regenerate PEFT's projections")
    rank = _positive_int("r", config.get("r", 256))
    A, B = extras["pvera_A"], extras["pvera_B"]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != 2 * rank or B.shape[1] != rank:
        raise _fail(f"adapter_config.json: r={rank} disagrees with the shared projections: pvera_A of shape "
                    f"{list(A.shape)} (2r x in), pvera_B of shape {list(B.shape)} (out x r)")
    for path, params in weights.items():
        d, b = params.get("pvera_lambda_d"), params.get("pvera_lambda_b")
        if d is None or b is None or tuple(d.shape) != (2 * rank,) or b.dim() != 1:
            raise _fail(f"module '{path}' needs pvera_lambda_d of {2 * rank} (2r) entries and a 1-D pvera_lambda_b, "
                        f"got {_shape(d)} and {_shape(b)}")
        params.update(pvera_A=A, pvera_B=B)
    seed = config.get("projection_prng_key", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: projection_prng_key must be an integer, got {seed!r}")
    config = {**config, "d_initial": config.get("d_initial", 0.1)}
    _number(config, "d_initial")
    return {"type": "pvera", "rank": rank, "d_initial": float(config["d_initial"]), "projection_seed": seed,
            "dropout": _dropout(config, "pvera_dropout")}, {}


def _write_pvera(kind, options, weights, site_options):
    """PEFT keeps one A and B sized for the largest site; every site's must be its leading part."""
    biggest = {name: max((params[name] for params in weights.values()), key=lambda t: t.numel())
               for name in ("pvera_A", "pvera_B")}
    for path, params in weights.items():
        rows, in_features = params["pvera_A"].shape
        out_features, rank = params["pvera_B"].shape
        if not (torch.equal(biggest["pvera_A"][:rows, :in_features], params["pvera_A"])
                and torch.equal(biggest["pvera_B"][:out_features, :rank], params["pvera_B"])):
            raise _fail(f"PVeRA module '{path}' has projections that are not slices of the largest ones; PEFT "
                        "needs one shared pair (sites of different shapes initialized by surgeon are independent)")
        del params["pvera_A"], params["pvera_B"]
    config = {"r": options["rank"], "d_initial": options["d_initial"], "save_projection": True,
              "projection_prng_key": options["projection_seed"], "pvera_dropout": options.get("dropout", 0.0),
              "sample_at_inference": False}
    return config, {"pvera_A": biggest["pvera_A"], "pvera_B": biggest["pvera_B"]}


# ---------------------------------------------------------------- OFT, BOFT, HRA

def _read_oft(config, weights, extras):
    if config.get("coft"):
        raise _fail("constrained OFT (coft=True) is not supported: its projection rewrites the weights in place")
    _no_dropout(config, "oft", "module_dropout")

    def block_size(path, params):
        size = (1 + math.isqrt(1 + 8 * params["oft_R"].shape[1])) // 2
        if size * (size - 1) // 2 != params["oft_R"].shape[1]:
            raise _fail(f"module '{path}': oft_R rows of {params['oft_R'].shape[1]} are not b*(b-1)/2")
        return size
    sizes = {path: block_size(path, params) for path, params in weights.items()}
    entry = {"type": "oft", "block_size": config.get("oft_block_size") or next(iter(sizes.values())),
             "block_share": bool(config.get("block_share", False)),
             "use_cayley_neumann": bool(config.get("use_cayley_neumann", True)),
             "num_cayley_neumann_terms": int(config.get("num_cayley_neumann_terms", 5))}
    return entry, _overrides(weights, lambda path, params: {"block_size": sizes[path]}, entry)


def _write_oft(kind, options, weights, site_options):
    sizes = {site_options.get(p, {}).get("block_size", options["block_size"]) for p in weights}
    if len(sizes) != 1:
        raise _fail(f"PEFT's OFT config holds one block size; these modules use {sorted(sizes)}")
    return {"r": 0, "oft_block_size": sizes.pop(), "block_share": options["block_share"], "coft": False,
            "use_cayley_neumann": options["use_cayley_neumann"], "module_dropout": 0.0,
            "num_cayley_neumann_terms": options["num_cayley_neumann_terms"], "init_weights": True}, {}


def _read_boft(config, weights, extras):
    _no_dropout(config, "boft", "boft_dropout")
    for path, params in weights.items():
        if params["boft_R"].dim() != 4:
            raise _fail(f"module '{path}': boft_R must be (factors, blocks, size, size)")
        params["boft_s"] = params["boft_s"].reshape(-1)
    def layout(path: str, params: dict) -> dict:
        return {"block_size": params["boft_R"].shape[-1], "butterfly_factor": params["boft_R"].shape[0]}
    entry = {"type": "boft", **layout(*next(iter(weights.items())))}
    return entry, _overrides(weights, layout, entry)


def _write_boft(kind, options, weights, site_options):
    for params in weights.values():
        params["boft_s"] = params["boft_s"].reshape(-1, 1)
    return {"boft_block_size": options["block_size"], "boft_block_num": 0, "boft_dropout": 0.0,
            "boft_n_butterfly_factor": options["butterfly_factor"], "init_weights": True}, {}


def _read_hra(config, weights, extras):
    config = {**config, "r": config.get("r", 8)}
    entry = {"type": "hra", "rank": _positive_int("r", config["r"]), "apply_GS": bool(config.get("apply_GS", False))}
    return entry, _overrides(weights, lambda path, params: {"rank": _rank(config, path, params, {"hra_u": 1})}, entry)


def _write_hra(kind, options, weights, site_options):
    return {"r": options["rank"], "apply_GS": options["apply_GS"], "init_weights": True}, {}


# ---------------------------------------------------------------- SHiRA

def _read_shira(config, weights, extras):
    """PEFT saves each site's support as (2, k) int32 (row, column) pairs; k = r * (in + out)."""
    _positive_int("r", config.get("r"))
    for path, params in weights.items():
        indices = params.get("shira_indices")
        if indices is None or indices.dim() != 2 or indices.shape[0] != 2 or indices.is_floating_point():
            raise _fail(f"module '{path}' needs integer shira_indices of shape (2, k); a checkpoint without "
                        "them would need PEFT's mask function, which surgeon does not rerun")
        params["shira_indices"] = indices.long()
    return {"type": "shira", "rank": int(config["r"])}, {}


def _write_shira(kind, options, weights, site_options):
    ranks = {site_options.get(path, {}).get("rank", options["rank"]) for path in weights}
    if None in ranks or len(ranks) != 1:
        raise _fail("PEFT sizes every SHiRA site as r * (in + out) with one r; this adapter has "
                    f"{'no rank (it is sized by fraction)' if None in ranks else f'ranks {sorted(ranks)}'}")
    for params in weights.values():
        params["shira_indices"] = params["shira_indices"].to(torch.int32)
    return {"r": ranks.pop(), "mask_type": "random", "random_seed": None, "init_weights": True}, {}


# ---------------------------------------------------------------- RoAd, FourierFT

ROAD_VARIANTS = ("road_1", "road_2", "road_4")


def _read_road(config, weights, extras):
    """One theta and one alpha vector per module (out / 2, out or 2 out long by variant)."""
    variant = config.get("variant", "road_1")
    if variant not in ROAD_VARIANTS:
        raise _fail(f"adapter_config.json: variant must be one of {list(ROAD_VARIANTS)}, got {variant!r}")
    group_size = _positive_int("group_size", config.get("group_size", 64))
    for path, params in weights.items():
        theta, alpha = params.get("road_theta"), params.get("road_alpha")
        if theta is None or alpha is None or theta.dim() != 1 or theta.shape != alpha.shape:
            raise _fail(f"module '{path}' needs 1-D road_theta and road_alpha of one size, got "
                        f"{None if theta is None else list(theta.shape)} and {None if alpha is None else list(alpha.shape)}")
    return {"type": "road", "variant": variant, "group_size": group_size}, {}


def _write_road(kind, options, weights, site_options):
    return {"variant": options["variant"], "group_size": options["group_size"], "init_weights": True}, {}


def _read_fourierft(config, weights, extras):
    """One spectrum per module; PEFT saves no frequency positions, they are redrawn from random_loc_seed."""
    seed = config.get("random_loc_seed", 777)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: random_loc_seed must be an integer (PEFT draws the frequency positions "
                    f"from it), got {seed!r}")
    config = {**config, "scaling": config.get("scaling", 150.0)}
    _number(config, "scaling")
    entry = {"type": "fourierft", "frequencies": _positive_int("n_frequency", config.get("n_frequency", 1000)),
             "scaling": float(config["scaling"]), "frequency_seed": seed}
    for path, params in weights.items():
        spectrum = params.get("fourierft_spectrum")
        if spectrum is None or spectrum.dim() != 1 or not spectrum.numel():
            raise _fail(f"module '{path}' needs a 1-D fourierft_spectrum, got "
                        f"{None if spectrum is None else list(spectrum.shape)}")
    return entry, _overrides(weights, lambda path, params: {"frequencies": params["fourierft_spectrum"].numel()},
                             entry)


def _suffix_key(path: str, name: str, why: str) -> str:
    """A pattern key for one module where PEFT matches keys as `.*\\.<key>$` (FourierFT's n_frequency_pattern,
    C3A's block_size_pattern): the module path after its first name, escaped."""
    head, dot, rest = path.partition(".")
    if not dot:
        raise _fail(f"PEFT's {name} cannot name the top-level module '{path}' alone; it has {why}")
    return re.escape(rest)


def _write_fourierft(kind, options, weights, site_options):
    pattern = {}
    for path, params in weights.items():
        count = params["fourierft_spectrum"].numel()
        if count != options["frequencies"]:
            pattern[_suffix_key(path, "n_frequency_pattern", f"{count} frequencies, the adapter "
                                f"{options['frequencies']}")] = count
    return {"n_frequency": options["frequencies"], "n_frequency_pattern": pattern, "scaling": options["scaling"],
            "random_loc_seed": options["frequency_seed"], "init_weights": True}, {}


# ---------------------------------------------------------------- HiRA, MiSS

def _read_hira(config, weights, extras):
    """hira_A (r x in) and hira_B (out x r) per module. Each module's rank is read from its tensors:
    PEFT 0.21's HiRA builds every module with `r` (its dispatch ignores rank_pattern), so the tensors,
    not the config's patterns, say what PEFT ran."""
    entry = {"type": "hira", "rank": _positive_int("r", config.get("r", 32)),
             "dropout": _dropout(config, "hira_dropout")}
    for path, params in weights.items():
        A, B = params.get("hira_A"), params.get("hira_B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise _fail(f"module '{path}' needs 2-D hira_A (r x in) and hira_B (out x r) of one rank (surgeon's HiRA "
                        f"takes Linear and Conv1D modules, not PEFT's conv layers), got "
                        f"{None if A is None else list(A.shape)} and {None if B is None else list(B.shape)}")
    return entry, _overrides(weights, lambda path, params: {"rank": params["hira_A"].shape[0]}, entry)


def _write_hira(kind, options, weights, site_options):
    ranks = {path: params["hira_A"].shape[0] for path, params in weights.items()}
    if set(ranks.values()) != {options["rank"]}:
        raise _fail(f"PEFT 0.21's HiRA builds every module with one r (it ignores rank_pattern); these modules "
                    f"have ranks {sorted(set(ranks.values()))}")
    return {"r": options["rank"], "hira_dropout": options.get("dropout", 0.0), "init_weights": True}, {}


MISS_MODES = {True: "balance", False: "balance", "bat": "bat", "mini": "mini"}   # PEFT's init_weights -> mode


def _read_miss(config, weights, extras):
    """One miss_block per module: r x out (balance), r x mini_r (mini) or (out / r) x r x r (bat)."""
    init = config.get("init_weights", True)
    if not any(init is key or (isinstance(init, str) and init == key) for key in MISS_MODES):
        raise _fail(f"adapter_config.json: init_weights={init!r} is no MiSS mode surgeon knows (True, False, "
                    "'bat', 'mini')")
    mode = MISS_MODES[init]
    rank = _positive_int("r", config.get("r", 64))
    mini_rank = _positive_int("mini_r", config.get("mini_r", 1))
    for path, params in weights.items():
        block = params.get("miss_block")
        fits = block is not None and (block.dim() == 3 and block.shape[1:] == (rank, rank) if mode == "bat"
                                      else block.dim() == 2 and block.shape[0] == rank
                                      and (mode != "mini" or block.shape[1] == mini_rank))
        if not fits:
            raise _fail(f"module '{path}': miss_block of shape {None if block is None else list(block.shape)} does "
                        f"not fit r={rank}{f', mini_r={mini_rank}' if mode == 'mini' else ''} in mode {mode}")
    # PEFT's bat forward never applies miss_dropout: its function has none
    dropout = 0.0 if mode == "bat" else _dropout(config, "miss_dropout")
    return {"type": "miss", "rank": rank, "mode": mode, "mini_rank": mini_rank, "dropout": dropout}, {}


def _write_miss(kind, options, weights, site_options):
    """PEFT's MiSS config holds one r, mini_r and mode for every module."""
    differs = {path: opts for path, opts in site_options.items() if path in weights and opts}
    if differs:
        raise _fail(f"PEFT's MiSS config holds one r, mini_r and mode; these modules differ: {differs}")
    init = {"balance": True, "bat": "bat", "mini": "mini"}[options["mode"]]
    return {"r": options["rank"], "mini_r": options["mini_rank"], "miss_dropout": options.get("dropout", 0.0),
            "init_weights": init}, {}


# ---------------------------------------------------------------- RandLoRA

def _randlora_basis(config: dict) -> str:
    return "very_sparse" if config.get("very_sparse") else "sparse" if config.get("sparse") else "dense"


def _read_randlora(config, weights, extras):
    """Per module randlora_lambda (r x n) and randlora_gamma (n x m); one randlora_A (r x 1 x m) and
    randlora_B (M x n x r) sized for the model's largest target (sites read their leading part), which
    PEFT saves at the model level and again under every module."""
    held = [params.get(name) for params in weights.values() for name in ("randlora_A", "randlora_B")]
    if not config.get("save_projection", True) or not {"randlora_A", "randlora_B"} <= set(extras) and None in held:
        raise _fail("the checkpoint does not hold randlora_A / randlora_B (save_projection=False); surgeon does not "
                    "regenerate PEFT's bases for a model it has not seen whole")
    rank = _positive_int("r", config.get("r", 32))
    seed = config.get("projection_prng_key", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: projection_prng_key must be an integer, got {seed!r}")
    config = {**config, "randlora_alpha": config.get("randlora_alpha", 640)}
    _number(config, "randlora_alpha")
    first = next(iter(weights.values()))
    A, B = (extras.get(name, first.get(name)) for name in ("randlora_A", "randlora_B"))
    if A is None or B is None or A.dim() != 3 or A.shape[0] != rank or A.shape[1] != 1 or B.dim() != 3 \
            or B.shape[2] != rank:
        raise _fail(f"adapter_config.json: r={rank} disagrees with the shared bases: randlora_A of shape "
                    f"{None if A is None else list(A.shape)} (r x 1 x m), randlora_B of shape "
                    f"{None if B is None else list(B.shape)} (M x n x r)")
    for path, params in weights.items():
        scale, gamma = params.get("randlora_lambda"), params.get("randlora_gamma")
        if scale is None or gamma is None or scale.dim() != 2 or gamma.dim() != 2 or scale.shape[0] != rank \
                or gamma.shape[0] != scale.shape[1]:
            raise _fail(f"module '{path}' needs randlora_lambda (r x n) and randlora_gamma (n x m) with r={rank}, got "
                        f"{None if scale is None else list(scale.shape)} and "
                        f"{None if gamma is None else list(gamma.shape)}")
        for name, shared in (("randlora_A", A), ("randlora_B", B)):
            own = params.get(name)
            if own is not None and (own.shape != shared.shape or not torch.equal(own, shared)):
                raise _fail(f"module '{path}' holds a {name} that differs from the model's; PEFT shares one pair")
        params.update(randlora_A=A, randlora_B=B)
    return {"type": "randlora", "rank": rank, "alpha": float(config["randlora_alpha"]), "projection_seed": seed,
            "basis": _randlora_basis(config), "dropout": _dropout(config, "randlora_dropout")}, {}


def _write_randlora(kind, options, weights, site_options):
    """PEFT keeps one A and B sized for the largest target; every site's must be their leading part."""
    biggest = {name: max((params[name] for params in weights.values()), key=lambda t: t.numel())
               for name in ("randlora_A", "randlora_B")}
    for path, params in weights.items():
        A, B = params["randlora_A"], params["randlora_B"]
        if not (torch.equal(biggest["randlora_A"][:, :, :A.shape[2]], A)
                and torch.equal(biggest["randlora_B"][:B.shape[0], :B.shape[1], :], B)):
            raise _fail(f"RandLoRA module '{path}' has bases that are not slices of the largest ones; PEFT needs one "
                        "shared pair (sites of different shapes initialized by surgeon draw their own)")
        params.update(randlora_A=biggest["randlora_A"], randlora_B=biggest["randlora_B"])   # as PEFT saves them
    config = {"r": options["rank"], "randlora_alpha": options["alpha"],
              "projection_prng_key": options["projection_seed"], "save_projection": True,
              "sparse": options["basis"] == "sparse", "very_sparse": options["basis"] == "very_sparse",
              "randlora_dropout": options.get("dropout", 0.0),
              "init_weights": True}
    return config, {"randlora_A": biggest["randlora_A"], "randlora_B": biggest["randlora_B"]}


# ---------------------------------------------------------------- DeLoRA, GraLoRA, C3A

def _shape(tensor) -> list | None:
    return None if tensor is None else list(tensor.shape)


def _read_delora(config, weights, extras):
    """delora_A (r x in), delora_B (out x r), delora_lambda (1) and the frozen input norms delora_w_norm
    (in) per module; r and its rank_pattern entries must agree with the tensors."""
    config = {**config, "r": config.get("r", 8), "delora_lambda": config.get("delora_lambda", 15)}
    _number(config, "delora_lambda")
    for path, params in weights.items():
        A, B = params.get("delora_A"), params.get("delora_B")
        scale, norms = params.get("delora_lambda"), params.get("delora_w_norm")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise _fail(f"module '{path}' needs 2-D delora_A (r x in) and delora_B (out x r) of one rank, got "
                        f"{_shape(A)} and {_shape(B)}")
        if scale is None or scale.numel() != 1 or norms is None or tuple(norms.shape) != (A.shape[1],):
            raise _fail(f"module '{path}' needs a one-element delora_lambda and delora_w_norm of the {A.shape[1]} "
                        f"input features (the base weight's column norms, which PEFT saves), got {_shape(scale)} and "
                        f"{_shape(norms)}")
        params["delora_lambda"] = scale.reshape(1)
    entry = {"type": "delora", "rank": _positive_int("r", config["r"]), "lambda": float(config["delora_lambda"]),
             "init": "default", "dropout": _dropout(config, "module_dropout")}

    def site(path: str, params: dict) -> dict:
        scale = peft_pattern(config, "lambda_pattern", path, config["delora_lambda"])
        _number({"lambda_pattern": scale}, "lambda_pattern")
        return {"rank": _rank(config, path, params, {"delora_A": 0, "delora_B": 1}), "lambda": float(scale)}
    return entry, _overrides(weights, site, entry)


def _write_delora(kind, options, weights, site_options):
    """Per-module ranks (read from the tensors) go out as rank_pattern; λ is a trained tensor, so the
    config's delora_lambda only records the initial value."""
    ranks = {path: params["delora_A"].shape[0] for path, params in weights.items()}
    return {"r": options["rank"], "delora_lambda": options["lambda"], "module_dropout": options.get("dropout", 0.0),
            "rank_pattern": {p: r for p, r in ranks.items() if r != options["rank"]}, "lambda_pattern": {},
            "init_weights": True}, {}


def _read_gralora(config, weights, extras):
    """gralora_A (k x in/k x r) and gralora_B (k x r x out/k) per module, with gralora_A_general (h x in) and
    gralora_B_general (out x h) where hybrid_r = h > 0. PEFT builds every module with the config's r, k
    and h (it has no patterns), so the tensors must have them."""
    config = {**config, "alpha": config.get("alpha", 64)}
    _number(config, "alpha")
    rank = _positive_int("r", config.get("r", 32))
    k = _positive_int("gralora_k", config.get("gralora_k", 2))
    hybrid = config.get("hybrid_r", 0)
    if not isinstance(hybrid, int) or isinstance(hybrid, bool) or hybrid < 0:
        raise _fail(f"adapter_config.json: hybrid_r must be a non-negative integer, got {hybrid!r}")
    if rank % k:
        raise _fail(f"adapter_config.json: r={rank} is not divisible by gralora_k={k}")
    for path, params in weights.items():
        A, B = params.get("gralora_A"), params.get("gralora_B")
        if A is None or B is None or A.dim() != 3 or B.dim() != 3 or A.shape[0] != k or B.shape[0] != k \
                or A.shape[2] != rank or B.shape[1] != rank:
            raise _fail(f"module '{path}': gralora_A {_shape(A)} and gralora_B {_shape(B)} do not fit r={rank}, "
                        f"gralora_k={k} (k x in/k x r and k x r x out/k)")
        general = (params.get("gralora_A_general"), params.get("gralora_B_general"))
        if hybrid == 0 and general != (None, None):
            raise _fail(f"module '{path}' holds gralora_A_general / gralora_B_general, but hybrid_r is 0")
        if hybrid and (None in general or general[0].shape[0] != hybrid or general[1].dim() != 2
                       or general[1].shape[1] != hybrid):
            raise _fail(f"module '{path}' needs gralora_A_general (hybrid_r x in) and gralora_B_general "
                        f"(out x hybrid_r) with hybrid_r={hybrid}, got {_shape(general[0])} and {_shape(general[1])}")
    return {"type": "gralora", "rank": rank, "alpha": float(config["alpha"]), "blocks": k, "hybrid_rank": hybrid,
            "init": "default", "dropout": _dropout(config, "gralora_dropout")}, {}


def _write_gralora(kind, options, weights, site_options):
    differs = {path: opts for path, opts in site_options.items() if path in weights and opts}
    if differs:
        raise _fail(f"PEFT's GraLoRA config holds one r, alpha, gralora_k and hybrid_r; these modules differ: "
                    f"{differs}")
    return {"r": options["rank"], "alpha": options["alpha"], "gralora_k": options["blocks"],
            "hybrid_r": options["hybrid_rank"], "gralora_dropout": options.get("dropout", 0.0),
            "init_weights": True}, {}


C3A_INITS = {True: "zeros", False: "xavier_uniform", "xavier_uniform": "xavier_uniform",
             "kaiming_uniform": "kaiming_uniform", "gaussian": "gaussian"}   # PEFT's init_weights -> surgeon's init


def _read_c3a(config, weights, extras):
    """One c3a_kernel (out/b x in/b x b) per module; each module's block size b is read from its kernel
    (block_size, or its block_size_pattern entry, in PEFT)."""
    init = config.get("init_weights", "xavier_uniform")
    if not any(init is key or (isinstance(init, str) and init == key) for key in C3A_INITS):
        raise _fail(f"adapter_config.json: init_weights={init!r} is no C3A init surgeon knows "
                    f"({list(C3A_INITS)})")
    entry = {"type": "c3a", "block_size": _positive_int("block_size", config.get("block_size", 256)),
             "init": C3A_INITS[init]}
    for path, params in weights.items():
        kernel = params.get("c3a_kernel")
        if kernel is None or kernel.dim() != 3 or not kernel.numel():
            raise _fail(f"module '{path}' needs a 3-D c3a_kernel (out/b x in/b x b), got {_shape(kernel)}")
    return entry, _overrides(weights, lambda path, params: {"block_size": params["c3a_kernel"].shape[2]}, entry)


def _write_c3a(kind, options, weights, site_options):
    pattern = {}
    for path, params in weights.items():
        size = params["c3a_kernel"].shape[2]
        if size != options["block_size"]:
            pattern[_suffix_key(path, "block_size_pattern", f"block size {size}, the adapter's "
                                f"{options['block_size']}")] = size
    return {"block_size": options["block_size"], "block_size_pattern": pattern, "init_weights": True}, {}


# ---------------------------------------------------------------- prefix tuning

def _read_prefix(config, weights, extras):
    """PEFT's table (n, layers * 2 * kv_heads * head_dim): per layer the key's, then the value's
    (kv_heads, n, head_dim) prefixes. It names no modules: layer l's become site '#l' (the l-th
    SDPA call in graph order) and the adapter targets every SDPA call ('*')."""
    if config.get("prefix_projection"):
        raise _fail("prefix_projection=True: the checkpoint holds PEFT's prefix MLP, not the prefixes; surgeon "
                    "imports prefix tuning only with prefix_projection=False")
    if config.get("num_transformer_submodules", 1) != 1:
        raise _fail("prefix tuning of an encoder-decoder (num_transformer_submodules=2) is not supported")
    _number(config, "num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")
    n, layers, heads = config["num_virtual_tokens"], config["num_layers"], config["num_attention_heads"]
    table = extras.get("prompt_embeddings")
    if table is None or tuple(table.shape) != (n, layers * 2 * config["token_dim"]) or config["token_dim"] % heads:
        raise _fail(f"prompt_embeddings of shape {None if table is None else list(table.shape)} does not fit "
                    f"num_virtual_tokens={n} x num_layers={layers} * 2 * token_dim={config['token_dim']}")
    per_layer = table.reshape(n, layers * 2, heads, -1).permute(1, 2, 0, 3)
    weights.update({f"#{layer}": {"prefix_k": per_layer[2 * layer].contiguous(),
                                  "prefix_v": per_layer[2 * layer + 1].contiguous()} for layer in range(layers)})
    return {"type": "prefix", "num_virtual_tokens": n, "targets": ["*"]}, {}


def _read_cartridge(config, weights, extras):
    """CARTRIDGE saves the same table as prefix tuning (its KV prefix is stored, never projected);
    its first num_frozen_tokens positions become each site's frozen prefix_k_frozen / prefix_v_frozen."""
    for key in ("prefix_projection", "encoder_hidden_size"):
        if key in config:
            raise _fail(f"adapter_config.json: '{key}' is a PREFIX_TUNING key, not CARTRIDGE's (peft_type is "
                        "CARTRIDGE)")
    frozen = config.get("num_frozen_tokens", 1)
    if not isinstance(frozen, int) or isinstance(frozen, bool) or frozen < 0 \
            or (isinstance(config.get("num_virtual_tokens"), int) and frozen > config["num_virtual_tokens"]):
        raise _fail(f"adapter_config.json: num_frozen_tokens must be an integer in [0, num_virtual_tokens="
                    f"{config.get('num_virtual_tokens')!r}], got {frozen!r}")
    entry, sites = _read_prefix(config, weights, extras)
    if frozen:
        for params in weights.values():
            for name in ("prefix_k", "prefix_v"):
                whole = params.pop(name)
                params[f"{name}_frozen"], params[name] = whole[:, :frozen].contiguous(), whole[:, frozen:].contiguous()
    return {**entry, "frozen_tokens": frozen}, sites


def _write_prefix(kind, options, weights, site_options):
    """One table from the sites in the adapter's order (insert orders sites by graph position). An adapter
    with frozen_tokens > 0 is written as CARTRIDGE (num_frozen_tokens), the PEFT type that freezes positions."""
    frozen = options.get("frozen_tokens", 0)
    for params in weights.values():
        for name in ("prefix_k", "prefix_v"):
            if f"{name}_frozen" in params:
                params[name] = torch.cat([params.pop(f"{name}_frozen"), params[name]], 1)
    shapes = {tuple(t.shape) for params in weights.values() for t in params.values()}
    if len(shapes) != 1:
        raise _fail(f"PEFT's prefix table holds one (kv_heads, n, head_dim) per layer; these sites use "
                    f"{sorted(shapes)}")
    kv_heads, n, head_dim = shapes.pop()
    stacked = torch.stack([params[p] for params in weights.values() for p in ("prefix_k", "prefix_v")])
    table = stacked.permute(2, 0, 1, 3).reshape(n, -1)
    layers = len(weights)
    weights.clear()
    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": n, "num_layers": layers, "token_dim": kv_heads * head_dim,
              "num_attention_heads": kv_heads, "num_transformer_submodules": 1, "inference_mode": True}
    if frozen:
        return {**config, "peft_type": "CARTRIDGE", "num_frozen_tokens": frozen}, {"prompt_embeddings": table}
    return {**config, "prefix_projection": False, "encoder_hidden_size": kv_heads * head_dim}, \
        {"prompt_embeddings": table}


def _read_adalora(config, weights, extras):
    """lora_A (k x in), lora_B (out x k) and lora_E (k x 1) per module: k = init_r, or for a module in
    rank_pattern (PEFT's mask of the init_r ranks its RankAllocator kept; the checkpoint holds only those)
    the mask's count of kept ranks. The scale divides by init_r either way (PEFT's ranknum). A module with
    no rank left adds nothing and gets no site."""
    config = {**config, "init_r": config.get("init_r", 12), "lora_alpha": config.get("lora_alpha", 8)}
    _number(config, "lora_alpha")
    init_r = _positive_int("init_r", config["init_r"])
    masks = config.get("rank_pattern") or {}
    if not isinstance(masks, dict):
        raise _fail(f"adapter_config.json: rank_pattern must be an object of '<module>.lora_E' -> a list of "
                    f"booleans, got {masks!r}")
    kept = {}
    for key, mask in masks.items():
        named = re.fullmatch(r"(.+)\.lora_E(\.[A-Za-z_]\w*)?", key)
        if named is None:
            raise _fail(f"adapter_config.json: rank_pattern key {key!r} does not name a module's lora_E")
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(m, bool) for m in mask):
            raise _fail(f"adapter_config.json: rank_pattern[{key!r}] must be a list of init_r={init_r} booleans "
                        f"(the ranks kept), got {mask!r}")
        if named.group(1) not in weights:
            raise _fail(f"adapter_config.json: rank_pattern names module '{named.group(1)}', which the checkpoint "
                        "holds no tensors for")
        kept[named.group(1)] = sum(mask)
    for path, params in list(weights.items()):
        A, B, E = params.get("adalora_A"), params.get("adalora_B"), params.get("adalora_E")
        rank = kept.get(path, init_r)
        if A is None or B is None or E is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank \
                or B.shape[1] != rank or tuple(E.shape) != (rank, 1):
            source = "the kept ranks of its rank_pattern mask" if path in kept else f"init_r={init_r}"
            raise _fail(f"module '{path}' needs lora_A ({rank} x in), lora_B (out x {rank}) and lora_E "
                        f"({rank} x 1) for its {rank} ranks ({source}), got {_shape(A)}, {_shape(B)} and {_shape(E)}")
        if rank == 0:
            del weights[path]
    if not weights:
        raise _fail("rank_pattern keeps no rank of any module: the adapter adds nothing")
    alpha = float(config["lora_alpha"])   # PEFT's scaling: lora_alpha, or the module's rank when it is <= 0
    entry = {"type": "adalora", "rank": init_r, "alpha": alpha if alpha > 0 else float(init_r), "ranknum": init_r,
             "dropout": _dropout(config, "lora_dropout")}

    def site(path: str, params: dict) -> dict:
        rank = kept.get(path, init_r)
        return {"rank": rank, "alpha": alpha if alpha > 0 else float(rank)}
    return entry, _overrides(weights, site, entry)


def _write_adalora(kind, options, weights, site_options):
    """init_r is the adapter's rank; a module with fewer ranks (read from the tensors) goes out as a
    rank_pattern mask keeping its first ones, which PEFT loads at that rank with the init_r divisor.
    PEFT holds one init_r divisor and one lora_alpha for every module, so other per-module ones are
    refused. The schedule keys are placeholders (training schedule is not run: total_step=1)."""
    init_r, alpha = options["rank"], options["alpha"]
    masks = {}
    for path, params in weights.items():
        opts = {**options, **site_options.get(path, {})}
        rank = params["adalora_A"].shape[0]
        ranknum = opts.get("ranknum") or opts["rank"]
        if ranknum != init_r or rank > init_r or opts["alpha"] != alpha:
            raise _fail(f"module '{path}' has rank {rank}, ranknum {ranknum} and alpha {opts['alpha']}; PEFT's "
                        f"AdaLoRA gives every module ranknum = init_r = {init_r} and lora_alpha = {alpha}, and "
                        "at most init_r ranks")
        if rank < init_r:
            masks[f"{path}.lora_E"] = [True] * rank + [False] * (init_r - rank)
    return {"init_r": init_r, "target_r": init_r, "lora_alpha": alpha, "lora_dropout": options.get("dropout", 0.0),
            "rank_pattern": masks or None, "init_lora_weights": True, "total_step": 1, "tinit": 0, "tfinal": 0,
            "deltaT": 1}, {}


def _read_peanut(config, weights, extras):
    """peanut_A (r x out), peanut_B (out x r) and `depth` r x r encoders and decoders per module; PEFT
    builds every module with the config's r, depth, act_fn and scaling (it has no patterns)."""
    from .peanut import ACTIVATIONS, MAX_DEPTH, layer_names

    config = {**config, "scaling": config.get("scaling", 1.0)}
    _number(config, "scaling")
    rank = _positive_int("r", config.get("r", 32))
    depth = config.get("depth", 0)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= MAX_DEPTH:
        raise _fail(f"adapter_config.json: depth must be an integer in [0, {MAX_DEPTH}], got {depth!r}")
    act = config.get("act_fn", "relu")
    if act not in ACTIVATIONS:
        raise _fail(f"adapter_config.json: act_fn {act!r} is not supported (surgeon takes {sorted(ACTIVATIONS)})")
    encoders, decoders = layer_names(depth)
    for path, params in weights.items():
        A, B = params.get("peanut_A"), params.get("peanut_B")
        if A is None or B is None or A.dim() != 2 or tuple(B.shape) != (A.shape[1], rank) or A.shape[0] != rank:
            raise _fail(f"module '{path}' needs peanut_A (r x out) and peanut_B (out x r) with r={rank}, got "
                        f"{_shape(A)} and {_shape(B)}")
        square = {name: params.get(name) for name in encoders + decoders}
        extra = sorted(set(params) - {"peanut_A", "peanut_B", *square})
        if extra or any(t is None or tuple(t.shape) != (rank, rank) for t in square.values()):
            raise _fail(f"module '{path}' needs depth={depth} encoders and decoders of {rank} x {rank}, got "
                        f"{ {n: _shape(t) for n, t in square.items()} }" + (f" and extra {extra}" if extra else ""))
    return {"type": "peanut", "rank": rank, "depth": depth, "activation": act, "scaling": float(config["scaling"]),
            "init": "default"}, {}


def _write_peanut(kind, options, weights, site_options):
    """PEFT holds one r, depth, act_fn and scaling for every module: per-module ones are refused."""
    for path, params in weights.items():
        differs = {**site_options.get(path, {})}
        if params["peanut_A"].shape[0] != options["rank"]:
            differs["rank"] = params["peanut_A"].shape[0]
        if differs:
            raise _fail(f"module '{path}' has its own {differs}; PEFT's PEANuT gives every module the same r, depth, "
                        "act_fn and scaling")
    return {"r": options["rank"], "depth": options["depth"], "act_fn": options["activation"],
            "scaling": options["scaling"], "init_weights": options["init"] == "default"}, {}


# ---------------------------------------------------------------- Super-Tuning

def _read_supertuning(config, weights, extras):
    """supertuning_values (k) at supertuning_indices (k flat positions into the out x in weight, int32 in
    PEFT; absent with save_precomputed_indices=False, then recomputed at insertion), plus
    supertuning_lora_A (r x in) and _B (out x r) when r is set (Supra). k follows from sparsity and the
    module's shape, which insertion checks."""
    sparsity, rank, alpha = config.get("sparsity", 0.99), config.get("r"), config.get("lora_alpha")
    _number({"sparsity": sparsity}, "sparsity")
    if not 0 <= sparsity < 1:
        raise _fail(f"adapter_config.json: sparsity must be in [0, 1), got {sparsity!r}")
    if rank is not None:
        _positive_int("r", rank)
        alpha = 2 * rank if alpha is None else alpha
        _number({"lora_alpha": alpha}, "lora_alpha")
    elif alpha is not None:
        raise _fail("adapter_config.json: lora_alpha is set but r is null (PEFT refuses it too)")
    for path, params in weights.items():
        values, indices = params.get("supertuning_values"), params.get("supertuning_indices")
        if indices is None and config.get("save_precomputed_indices", True):
            raise _fail(f"module '{path}' has no supertuning_indices, but the config says save_precomputed_indices "
                        "is true")
        if indices is not None and (values is None or values.dim() != 1 or indices.dim() != 1
                                    or indices.shape != values.shape or indices.is_floating_point()
                                    or (indices.numel() and int(indices.min()) < 0)):
            raise _fail(f"module '{path}' needs 1-D supertuning_values and non-negative integer supertuning_indices "
                        f"of one length, got {_shape(values)} and {_shape(indices)}")
        if values is None or values.dim() != 1:
            raise _fail(f"module '{path}' needs 1-D supertuning_values, got {_shape(values)}")
        if indices is not None:   # else recomputed from the base weight at insertion, as PEFT does at load
            params["supertuning_indices"] = indices.long()
        A, B = params.get("supertuning_A"), params.get("supertuning_B")
        if (A is None) != (rank is None) or (B is None) != (rank is None):
            raise _fail(f"module '{path}' {'lacks' if rank is not None else 'has'} supertuning_lora_A / _B, but the "
                        f"config says r={rank!r}")
        if rank is not None and (A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank):
            raise _fail(f"module '{path}' needs supertuning_lora_A (r x in) and supertuning_lora_B (out x r) with "
                        f"r={rank}, got {_shape(A)} and {_shape(B)}")
    select_top = config.get("select_top", True)
    if not isinstance(select_top, bool):
        raise _fail(f"adapter_config.json: select_top must be true or false, got {select_top!r}")
    return {"type": "supertuning", "sparsity": float(sparsity), "select_top": select_top, "rank": rank,
            "alpha": None if rank is None else float(alpha), "init": "default",
            "dropout": _dropout(config, "lora_dropout") if rank is not None else 0.0}, {}


def _write_supertuning(kind, options, weights, site_options):
    for params in weights.values():
        params["supertuning_indices"] = params["supertuning_indices"].to(torch.int32)
    rank = options["rank"]
    alpha = None if rank is None else (options["alpha"] if options["alpha"] is not None else 2 * rank)
    return {"sparsity": options["sparsity"], "select_top": options["select_top"], "r": rank, "lora_alpha": alpha,
            "lora_dropout": options["dropout"] if rank is not None else 0.0, "init_weights": True,
            "save_precomputed_indices": True}, {}


def _read_beft(config, weights, extras):
    """One beft_bias per module, saved 1 x out by PEFT; read as a vector of out."""
    for path, params in weights.items():
        bias = params.get("beft_bias")
        if bias is None or bias.dim() not in (1, 2) or (bias.dim() == 2 and bias.shape[0] != 1) or not bias.numel():
            raise _fail(f"module '{path}' needs a beft_bias of shape [1, out], got {_shape(bias)}")
        params["beft_bias"] = bias.reshape(-1)
    return {"type": "beft", "init": "default"}, {}


def _write_beft(kind, options, weights, site_options):
    for params in weights.values():
        params["beft_bias"] = params["beft_bias"].reshape(1, -1)
    return {"init_weights": True}, {}


# ---------------------------------------------------------------- AdaMSS

ADAMSS_MAX_SUBSPACES = 64   # PEFT keys adamss_A.<i> / adamss_B.<i> read and written for i below this
ADAMSS_NAMES = {"adamss_basis": "adamss_newB",
                **{f"adamss_{m}_{i}": f"adamss_{m}.{i}" for i in range(ADAMSS_MAX_SUBSPACES) for m in "AB"}}


def _read_adamss(config, weights, extras):
    """Per module the basis adamss_newB (R x in, + 1 column with a bias) and per subspace i adamss_A.<i>
    (r_i x R) and adamss_B.<i> (|I_i| x r_i), packed into surgeon's adamss_A (stacked) and adamss_B
    (flattened); each module's ranks and subspace sizes become its site options. PEFT does not save the
    clusters: insertion reclusters the base weight with PEFT's scikit-learn KMeans and checks the sizes."""
    entry = {"type": "adamss", "rank": _positive_int("r", config.get("r", 100)),
             "num_subspaces": _positive_int("num_subspaces", config.get("num_subspaces", 5)),
             "subspace_rank": _positive_int("subspace_rank", config.get("subspace_rank", 1)),
             "seed": config.get("random_seed", 0), "clustering": "sklearn", "init": "default",
             "dynamic_rank": bool(config.get("use_dynamic_rank", False))}
    if not isinstance(entry["seed"], int) or isinstance(entry["seed"], bool):
        raise _fail(f"adapter_config.json: random_seed must be an integer, got {entry['seed']!r}")
    sites = {}
    for path, params in weights.items():
        basis = params.get("adamss_basis")
        count = sum(1 for name in params if name.startswith("adamss_A_"))
        A = [params.pop(f"adamss_A_{i}", None) for i in range(count)]
        B = [params.pop(f"adamss_B_{i}", None) for i in range(count)]
        if basis is None or basis.dim() != 2 or not count or any(name.startswith("adamss_B_") for name in params):
            raise _fail(f"module '{path}' needs adamss_newB (R x in) and adamss_A.<i>, adamss_B.<i> for subspaces "
                        f"0, 1, ..., got {_shape(basis)} and {count} A matrices")
        for i, (A_i, B_i) in enumerate(zip(A, B)):
            if A_i is None or B_i is None or A_i.dim() != 2 or B_i.dim() != 2 or A_i.shape[1] != basis.shape[0] \
                    or B_i.shape[1] != A_i.shape[0]:
                raise _fail(f"module '{path}': subspace {i} needs adamss_A.{i} (r_i x {basis.shape[0]}) and "
                            f"adamss_B.{i} (rows x r_i), got {_shape(A_i)} and {_shape(B_i)}")
        params.update(adamss_A=torch.cat(A), adamss_B=torch.cat([B_i.flatten() for B_i in B]))
        sites[path] = {"ranks": [A_i.shape[0] for A_i in A], "sizes": [B_i.shape[0] for B_i in B]}
    return entry, sites


def _write_adamss(kind, options, weights, site_options):
    from .adamss import ranks_of

    if options["clustering"] != "sklearn":
        raise _fail("PEFT reclusters an AdaMSS adapter with scikit-learn's KMeans when it loads it; this one was "
                    "clustered by surgeon's k-means (clustering: kmeans), so PEFT would scatter its rows "
                    "elsewhere: make it with clustering: sklearn to export it")
    for path, params in weights.items():
        opts = {**options, **site_options.get(path, {})}
        subspaces, ranks = opts["subspaces"], opts["ranks"]
        if not options["dynamic_rank"] and ranks != ranks_of(subspaces, options["subspace_rank"]):
            raise _fail(f"module '{path}' has subspace ranks {ranks}, which PEFT would not rebuild from "
                        f"subspace_rank={options['subspace_rank']}")
        A, B = params.pop("adamss_A"), params.pop("adamss_B")
        params.pop("adamss_rows")   # PEFT rebuilds its scatter index from the clustering
        row = flat = 0
        for i, (members, r) in enumerate(zip(subspaces, ranks)):
            params[f"adamss_A_{i}"] = A[row:row + r]
            params[f"adamss_B_{i}"] = B[flat:flat + len(members) * r].reshape(len(members), r)
            row, flat = row + r, flat + len(members) * r
    return {"r": options["rank"], "num_subspaces": options["num_subspaces"],
            "subspace_rank": options["subspace_rank"], "random_seed": options["seed"],
            "init_weights": "orthogonal", "use_asa": False, "use_dynamic_rank": options["dynamic_rank"]}, {}


def _read_waveft(config, weights, extras):
    """One waveft_spectrum per module (its length is the module's n, which also covers PEFT's
    proportional_parameters); PEFT saves no positions, they are redrawn from random_loc_seed."""
    from .waveft import wavelet_refusal

    seed, family, idwt = (config.get(k, d) for k, d in (("random_loc_seed", 777), ("wavelet_family", "db1"),
                                                         ("use_idwt", True)))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: random_loc_seed must be an integer (PEFT draws the coefficient positions "
                    f"from it), got {seed!r}")
    if not isinstance(idwt, bool):
        raise _fail(f"adapter_config.json: use_idwt must be true or false, got {idwt!r}")
    if not isinstance(family, str) or (idwt and wavelet_refusal(family)):
        raise _fail(f"adapter_config.json: wavelet_family {family!r}: "
                    f"{wavelet_refusal(family) if isinstance(family, str) else 'must be a string'}")
    config = {**config, "scaling": config.get("scaling", 25.0)}
    _number(config, "scaling")
    entry = {"type": "waveft", "frequencies": _positive_int("n_frequency", config.get("n_frequency", 2592)),
             "scaling": float(config["scaling"]), "wavelet": family, "idwt": idwt, "frequency_seed": seed}
    for path, params in weights.items():
        spectrum = params.get("waveft_spectrum")
        if spectrum is None or spectrum.dim() != 1 or not spectrum.numel():
            raise _fail(f"module '{path}' needs a 1-D waveft_spectrum, got "
                        f"{None if spectrum is None else list(spectrum.shape)}")
    return entry, _overrides(weights, lambda path, params: {"frequencies": params["waveft_spectrum"].numel()}, entry)


def _write_waveft(kind, options, weights, site_options):
    pattern = {}
    for path, params in weights.items():
        count = params["waveft_spectrum"].numel()
        if count != options["frequencies"]:
            pattern[_suffix_key(path, "n_frequency_pattern", f"{count} coefficients, the adapter "
                                f"{options['frequencies']}")] = count
    return {"n_frequency": options["frequencies"], "n_frequency_pattern": pattern, "scaling": options["scaling"],
            "wavelet_family": options["wavelet"], "use_idwt": options["idwt"],
            "random_loc_seed": options["frequency_seed"], "proportional_parameters": False, "init_weights": True}, {}


# ---------------------------------------------------------------- PSOFT

PSOFT_KEYS = {"psoft_alpha": "alpha", "psoft_svd_lowrank_niter": "lowrank_niter", "random_seed": "seed",
              "psoft_orth": "orth", "psoft_mag_a": "mag_a", "psoft_mag_b": "mag_b",
              "use_cayley_neumann": "use_cayley_neumann", "num_cayley_neumann_terms": "num_cayley_neumann_terms",
              "cayley_neumann_eps": "cayley_neumann_eps"}   # PEFT config key -> surgeon option, same value


def _read_psoft(config, weights, extras):
    """psoft_R (r (r - 1) / 2 skew entries, or r x r without psoft_orth) and the vectors of psoft_mag_a / _b
    per module; PEFT saves no A and B (insert rebuilds them from the base weight, as PEFT does). PSOFT has
    no rank_pattern: every module has r."""
    from .psoft import PSOFT

    rank = _positive_int("r", config.get("r", 32))
    entry = {"type": "psoft", "rank": rank, "dropout": _dropout(config, "psoft_dropout"), "init": "default",
             "ab_init": {"psoft_init": "psoft", "pissa_init": "pissa"}.get(config.get("ab_svd_init", "psoft_init")),
             "svd": config.get("psoft_svd", "full")}
    if entry["ab_init"] is None or entry["svd"] not in ("full", "lowrank"):
        raise _fail(f"adapter_config.json: ab_svd_init={config.get('ab_svd_init')!r} / psoft_svd="
                    f"{config.get('psoft_svd')!r} is not one of 'psoft_init', 'pissa_init' / 'full', 'lowrank'")
    for key, option in PSOFT_KEYS.items():
        entry[option] = config.get(key, PSOFT.options[option].default)
    if entry["cayley_neumann_eps"] is not None and not entry["use_cayley_neumann"]:
        entry["cayley_neumann_eps"] = None   # PEFT ignores it without the series
    shape = (rank * (rank - 1) // 2,) if entry["orth"] else (rank, rank)
    wanted = {"psoft_R": shape, **{f"psoft_vector_{s}": (rank,) for s in ("a", "b") if entry[f"mag_{s}"]}}
    for path, params in weights.items():
        got = {name: tuple(t.shape) for name, t in params.items()}
        if got != wanted:
            raise _fail(f"module '{path}' has {got}; r={rank}, psoft_orth={entry['orth']}, psoft_mag_a="
                        f"{entry['mag_a']}, psoft_mag_b={entry['mag_b']} need {wanted}")
    return entry, {}


def _write_psoft(kind, options, weights, site_options):
    differs = {path: opts for path, opts in site_options.items() if path in weights and opts}
    if differs:
        raise _fail(f"PEFT's PSOFT config holds one r and one set of options; these modules differ: {differs}")
    for params in weights.values():
        del params["psoft_A"], params["psoft_B"]   # PEFT rebuilds them from the base weight
    return {"r": options["rank"], "psoft_dropout": options.get("dropout", 0.0),
            "ab_svd_init": f"{options['ab_init']}_init", "psoft_svd": options["svd"],
            **{key: options[option] for key, option in PSOFT_KEYS.items()}, "init_weights": True}, {}


# ---------------------------------------------------------------- GLoRA

GLORA_CONFIG = {"config_A_B": ("AB", ("lora", "vector", "constant", "none"), "lora", "a_b"),
                "config_C": ("C", ("lora", "vector", "none"), "lora", "c"),
                "config_D_E": ("DE", ("vector", "constant", "none"), "constant", "d_e")}   # key -> paths, modes, default, option


def _glora_expected(path: str, letter: str, mode: str, params: dict, rank: int) -> set[str]:
    """The tensors path `letter` holds in `mode` (its rank checked), after its `zeros` buffer was dropped."""
    if mode == "lora":
        down, up = params.get(f"glora_{letter}_Xd"), params.get(f"glora_{letter}_Xu")
        if down is None or up is None or down.dim() != 2 or up.dim() != 2 or down.shape[1] != rank \
                or up.shape[0] != rank:
            raise _fail(f"module '{path}': glora_{letter} is a lora path of r={rank}, which needs 2-D Xd (n x r) and "
                        f"Xu (r x m), got {_shape(down)} and {_shape(up)}")
        return {f"glora_{letter}_Xd", f"glora_{letter}_Xu"}
    if mode == "none":
        return set()
    value = params.get(f"glora_{letter}_X")
    column = letter in "ABC"
    fits = value is not None and (value.numel() == 1 and value.dim() == 1 if mode == "constant" else
                                  value.dim() == 2 and value.shape[1] == 1 if column else value.dim() == 1)
    if not fits:
        want = "one element" if mode == "constant" else "an n x 1 column" if column else "a 1-D vector"
        raise _fail(f"module '{path}': glora_{letter} is a {mode} path, which needs X of {want}, got {_shape(value)}")
    return {f"glora_{letter}_X"}


def _read_glora(config, weights, extras):
    """PEFT's glora_A .. glora_E per module, each as its config_A_B / config_C / config_D_E says: Xd and Xu
    (lora), X (vector, constant) or a `zeros` buffer (none; and C, D, E of a module without a bias). The
    buffers must be zero (PEFT would add them) and are dropped; whether a module has a bias is read from
    whether it holds C, D, E."""
    modes = {}
    for key, (letters, choices, default, _) in GLORA_CONFIG.items():
        mode = config.get(key, default)
        if mode not in choices:
            raise _fail(f"adapter_config.json: {key}={mode!r} is not one of {list(choices)}")
        modes |= {letter: mode for letter in letters}
    rank = _positive_int("r", config.get("r", 8))
    sites = {}
    for path, params in weights.items():
        for letter in "ABCDE":
            zeros = params.pop(f"glora_{letter}_zeros", None)
            if zeros is not None and bool(zeros.any()):
                raise _fail(f"module '{path}': glora_{letter}.zeros (the buffer of a 'none' path) is not zero")
        held = {letter: any(name.startswith(f"glora_{letter}_") for name in params)
                for letter in "CDE" if modes[letter] != "none"}
        if len(set(held.values())) > 1:
            raise _fail(f"module '{path}' holds GLoRA bias paths {[k for k, v in held.items() if v]} but not "
                        f"{[k for k, v in held.items() if not v]}: PEFT makes all of them on a layer with a bias, "
                        "none on a layer without")
        biased = next(iter(held.values()), None)
        expected = set().union(*(_glora_expected(path, letter, modes[letter], params, rank)
                                 for letter in ("AB" + "CDE" * bool(biased))))
        if set(params) != expected:
            raise _fail(f"module '{path}' holds {sorted(set(params) - expected)} which a GLoRA of {modes} "
                        f"does not have")
        if biased is not None:
            sites[path] = {"biased": biased}
    entry = {"type": "glora", "rank": rank, "init": "default",
             **{option: modes[letters[0]] for letters, _, _, option in GLORA_CONFIG.values()}}
    return entry, sites


def _write_glora(kind, options, weights, site_options):
    """One r and config_* for every module (PEFT has no patterns). PEFT saves a zeros buffer for each empty
    path; it is written where the module's tensors give its shape (PEFT makes any other one itself)."""
    differs = {path: {k: v for k, v in opts.items() if k != "biased"} for path, opts in site_options.items()
               if path in weights}
    differs = {path: opts for path, opts in differs.items() if opts}
    if differs:
        raise _fail(f"PEFT's GLoRA config holds one r, config_A_B, config_C and config_D_E; these modules differ: "
                    f"{differs}")
    for params in weights.values():
        rows = next((t.shape[0] for n, t in params.items() if n in ("glora_A_Xd", "glora_A_X", "glora_D_X")
                     and t.numel() > 1), None)
        cols = next((t.shape[1] if n == "glora_A_Xu" else t.shape[0] for n, t in params.items()
                     if n in ("glora_A_Xu", "glora_C_Xd", "glora_C_X")), None)
        empty = {"A": (rows, cols), "B": (rows, cols), "C": (cols, 1), "D": (rows,), "E": (rows,)}
        for letter, shape in empty.items():
            if not any(n.startswith(f"glora_{letter}_") for n in params) and None not in shape:
                params[f"glora_{letter}_zeros"] = torch.zeros(shape)
    return {"r": options["rank"], "config_A_B": options["a_b"], "config_C": options["c"],
            "config_D_E": options["d_e"], "init_weights": True}, {}


# ---------------------------------------------------------------- parameter copies: LN tuning, trainable tokens

def _read_ln_tuning(config, weights, extras):
    """PEFT keeps a whole copy of each targeted module (`<module>.ln_tuning_layers.<name>`); surgeon's sites
    are the norm's parameters, so `weight` and `bias` become sites `<module>.weight` / `<module>.bias`."""
    modules = sorted(weights)
    for module in modules:
        for name, tensor in weights.pop(module).items():
            if tensor.dim() != 1:
                raise _fail(f"module '{module}': ln_tuning_layers.{name.rpartition('_')[2]} has shape "
                            f"{list(tensor.shape)}; surgeon's ln_tuning trains norms (1-D weight and bias)")
            weights[f"{module}.{name.rpartition('_')[2]}"] = {"ln_tuning": tensor}
    return {"type": "ln_tuning", "targets": modules}, {}


def _write_ln_tuning(kind, options, weights, site_options):
    for path in list(weights):
        module, _, name = path.rpartition(".")
        if name not in ("weight", "bias"):
            raise _fail(f"PEFT's LN tuning checkpoint holds a norm's weight and bias; '{path}' is neither")
        weights.setdefault(module, {})[f"ln_tuning_{name}"] = weights.pop(path)["ln_tuning"]
    return {"exclude_modules": None}, {}


def _read_trainable_tokens(config, weights, extras):
    """One trainable_tokens_delta (k x hidden, the new rows of token_indices) per embedding module named by
    target_modules; a module it does not name holds the copy PEFT saves for an lm_head tied to the embedding
    (the same rows: surgeon's tied head reads the embedding's table), checked and dropped."""
    ids = config.get("token_indices")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise _fail(f"adapter_config.json: token_indices must be a non-empty list of integers, got {ids!r}")
    targets = config.get("target_modules") or "embed_tokens"
    whole = isinstance(targets, str)

    def targeted(path: str) -> bool:
        return _matches(targets, path, "target_modules", whole=True) if whole else \
            any(path == t or path.endswith("." + t) for t in targets)
    embeddings = sorted(path for path in weights if targeted(path))
    for path, params in list(weights.items()):
        rows = params["trainable_tokens_delta"]
        if rows.dim() != 2 or rows.shape[0] != len(ids):
            raise _fail(f"module '{path}': trainable_tokens_delta of shape {list(rows.shape)} does not hold one row "
                        f"for each of the {len(ids)} token_indices")
        if path not in embeddings:
            if not any(torch.equal(rows, weights[e]["trainable_tokens_delta"]) for e in embeddings):
                raise _fail(f"module '{path}' is not in target_modules {targets!r} and its rows are no tied copy of "
                            "a targeted embedding's")
            del weights[path]
    for path in embeddings:
        weights[f"{path}.weight"] = weights.pop(path)
    init = config.get("init_weights", True)
    return {"type": "trainable_tokens", "targets": embeddings, "token_indices": ids,
            "init": "default" if init is not False else "random"}, {}


def _write_trainable_tokens(kind, options, weights, site_options):
    """PEFT's config holds one token_indices; the rows go out under each embedding module (a tied head's
    copy is made by PEFT when it loads, from the embedding's)."""
    ids = {tuple(params["trainable_tokens_indices"].tolist()) for params in weights.values()}
    if len(ids) != 1:
        raise _fail(f"PEFT's trainable tokens config holds one token_indices; these sites train {sorted(ids)}")
    for path in list(weights):
        weights[path.removesuffix(".weight")] = {"trainable_tokens_delta": weights.pop(path)["trainable_tokens_delta"]}
    return {"token_indices": list(ids.pop()), "init_weights": True}, {}


# ---------------------------------------------------------------- VB-LoRA

VBLORA_TOPK_FILL = -1e4   # a finite logit below every log(weight): never picked, exp(fill - max) == 0 exactly


def _vblora_logits(path: str, params: dict, name: str, count: int) -> torch.Tensor | None:
    """`name`'s logits, rebuilt from PEFT's save_only_topk_weights form where the module holds that (its top-k
    indices and first k - 1 softmax weights): log(weights) at the indices, as PEFT rebuilds them, and a finite
    fill elsewhere (PEFT's -inf, which no surgeon file takes) that the top-k never picks."""
    indices, weights = params.pop(f"{name}_topk_indices", None), params.pop(f"{name}_topk_weights", None)
    if indices is None and weights is None:
        return params.get(name)
    if indices is None or weights is None or indices.is_floating_point() or indices.dim() != 3 \
            or weights.shape != (*indices.shape[:2], indices.shape[2] - 1):
        raise _fail(f"module '{path}': {name}_topk_indices {_shape(indices)} and {name}_topk_weights "
                    f"{_shape(weights)} are not PEFT's top-k form (weights: one fewer than indices per sub-vector)")
    indices = indices.long()
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < count:
        raise _fail(f"module '{path}': {name}_topk_indices point past the bank's {count} vectors")
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], -1).float()
    picked = torch.where(weights > 0, weights.clamp_min(torch.finfo(torch.float32).tiny).log(),
                         torch.tensor(VBLORA_TOPK_FILL))
    return torch.full((*indices.shape[:2], count), VBLORA_TOPK_FILL).scatter(-1, indices, picked)


def _read_vblora(config, weights, extras):
    """Per module vblora_logits_A (r x in/L x n) and vblora_logits_B (out/L x r x n), or their top-k form
    (save_only_topk_weights); one vblora_vector_bank (n x L) at the model level, read by every module."""
    bank = extras.get("vblora_vector_bank")
    if bank is None or bank.dim() != 2:
        raise _fail(f"the checkpoint needs the model-level vblora_vector_bank (num_vectors x vector_length), got "
                    f"{_shape(bank)}")
    if not weights:
        raise _fail("the checkpoint holds a vector bank but no module's vblora_logits")
    count, length = bank.shape
    rank, topk = _positive_int("r", config.get("r", 4)), _positive_int("topk", config.get("topk", 2))
    for key, value in (("num_vectors", count), ("vector_length", length)):
        if config.get(key, value) != value:
            raise _fail(f"adapter_config.json: {key}={config[key]!r} disagrees with the vector bank of shape "
                        f"{list(bank.shape)}")
    for path, params in weights.items():
        A, B = (_vblora_logits(path, params, name, count) for name in ("vblora_logits_A", "vblora_logits_B"))
        if A is None or B is None or A.dim() != 3 or B.dim() != 3 or A.shape[0] != rank or B.shape[1] != rank \
                or A.shape[2] != count or B.shape[2] != count:
            raise _fail(f"module '{path}' needs vblora_logits_A (r x in/L x n) and vblora_logits_B (out/L x r x n) "
                        f"with r={rank}, n={count}, got {_shape(A)} and {_shape(B)}")
        params.update(vblora_logits_A=A, vblora_logits_B=B, vblora_vector_bank=bank)
    config = {"init_vector_bank_bound": 0.02, "init_logits_std": 0.1, **config}
    _number(config, "init_vector_bank_bound", "init_logits_std")
    return {"type": "vblora", "rank": rank, "num_vectors": count, "vector_length": length, "topk": topk,
            "init_bank_bound": float(config["init_vector_bank_bound"]),
            "init_logits_std": float(config["init_logits_std"]), "dropout": _dropout(config, "vblora_dropout")}, {}


def _write_vblora(kind, options, weights, site_options):
    """Full logits per module (PEFT's save_only_topk_weights=False) and the one bank at the model level."""
    differs = {path: opts for path, opts in site_options.items() if path in weights and opts}
    if differs:
        raise _fail(f"PEFT's VB-LoRA config holds one r, topk, num_vectors and vector_length; these modules differ: "
                    f"{differs}")
    banks = [params.pop("vblora_vector_bank") for params in weights.values()]
    bank = banks[0]
    if any(other is not bank and not torch.equal(other, bank) for other in banks):
        raise _fail("the modules hold different vector banks; PEFT's VB-LoRA shares one")
    return {"r": options["rank"], "num_vectors": options["num_vectors"], "vector_length": options["vector_length"],
            "topk": options["topk"], "vblora_dropout": options.get("dropout", 0.0),
            "init_vector_bank_bound": options["init_bank_bound"], "init_logits_std": options["init_logits_std"],
            "save_only_topk_weights": False}, {"vblora_vector_bank": bank}


# ---------------------------------------------------------------- DEFT

def _read_deft(config, weights, extras):
    """deft_P (out x r) and deft_R (r x in, none with para) per module; PEFT caps r at a module's out (its only
    per-module rank: DEFT has no rank_pattern)."""
    rank = _positive_int("r", config.get("r", 8))
    method, para, alpha = config.get("decomposition_method", "relu"), bool(config.get("para", False)), \
        config.get("alpha")
    if method not in ("relu", "qr"):
        raise _fail(f"adapter_config.json: decomposition_method must be 'relu' or 'qr', got {method!r}")
    if alpha is not None:
        _number(config, "alpha")
    config = {**config, "init_scale": config.get("init_scale", 1.0)}
    _number(config, "init_scale")
    for path, params in weights.items():
        P, R = params.get("deft_P"), params.get("deft_R")
        width = None if P is None or P.dim() != 2 else min(rank, P.shape[0])
        if width is None or P.shape[1] != width or (R is None) != para or (
                R is not None and (R.dim() != 2 or R.shape[0] != width)):
            raise _fail(f"module '{path}': deft_P {_shape(P)} and deft_R {_shape(R)} do not fit r={rank}, para={para} "
                        "(out x min(r, out) and, without para, min(r, out) x in)")
    entry = {"type": "deft", "rank": rank, "decomposition": method, "alpha": alpha, "para": para, "init": "default",
             "init_scale": float(config["init_scale"]), "dropout": _dropout(config, "deft_dropout")}
    return entry, _overrides(weights, lambda path, params: {"rank": params["deft_P"].shape[1]}, entry)


def _write_deft(kind, options, weights, site_options):
    for path, params in weights.items():
        out_features, rank = params["deft_P"].shape
        if rank != min(options["rank"], out_features):
            raise _fail(f"PEFT's DEFT builds every module with r={options['rank']} (capped at its out); module "
                        f"'{path}' has rank {rank}")
    return {"r": options["rank"], "decomposition_method": options["decomposition"], "alpha": options["alpha"],
            "para": options["para"], "init_scale": options["init_scale"],
            "deft_dropout": options.get("dropout", 0.0), "init_weights": True}, {}


# ---------------------------------------------------------------- TinyLoRA, Uni-LoRA

TINYLORA_INITS = {True: "zeros", "uniform": "uniform"}   # PEFT's init_weights -> surgeon's init


def _tinylora_layers(weights: dict, rank: int, u: int, seed: int) -> dict[str, int]:
    """Each module's layer index in PEFT's order (which seeds its projections): the i in 0..N-1 with
    P == N(0, 1/r) drawn from projection_seed + i, as PEFT draws it; a module whose P no i gives is an error."""
    from .tinylora import projections

    drawn: dict[tuple[int, int], torch.Tensor] = {}
    layers = {}
    for path, params in weights.items():
        P = params["tinylora_P"]
        for i in range(len(weights)):
            key = (i, P.shape[1])
            if key not in drawn:
                drawn[key] = projections({"projection_seed": seed, "u": u, "layer": i}, P.shape[1])
            if torch.equal(drawn[key].to(P.dtype), P):
                layers[path] = i
                break
        else:
            raise _fail(f"module '{path}': its tinylora_P is none of the projections PEFT draws from "
                        f"projection_seed={seed} for layers 0..{len(weights) - 1}, so its layer (and weight-tying "
                        "group) cannot be told")
    if sorted(layers.values()) != list(range(len(weights))):
        raise _fail("two modules hold the same tinylora_P; PEFT draws one per layer")
    return layers


def _read_tinylora(config, weights, extras):
    """Per module tinylora_A (r x in), tinylora_B (out x r) and tinylora_P (u x r x r), r clamped to min(in, out);
    one tinylora_v (u) per weight-tying group at the model level (tinylora_v.0, .1 ...). A module's layer index,
    which picks its group, is read from its P (PEFT seeds P with projection_seed + layer)."""
    if not config.get("save_projection", True) or any("tinylora_P" not in p for p in weights.values()):
        raise _fail("the checkpoint does not hold tinylora_P (save_projection=False); surgeon reads each module's "
                    "layer index (and so its weight-tying group) from its projections")
    rank, u = _positive_int("r", config.get("r", 2)), _positive_int("u", config.get("u", 64))
    seed, tying = config.get("projection_seed", 42), config.get("weight_tying", 0.0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: projection_seed must be an integer, got {seed!r}")
    _number({"weight_tying": tying}, "weight_tying")
    init = config.get("init_weights", True)
    if not any(init is key or (isinstance(init, str) and init == key) for key in TINYLORA_INITS):
        raise _fail(f"adapter_config.json: init_weights={init!r} is no TinyLoRA init surgeon knows (True, 'uniform')")
    for path, params in weights.items():
        A, B, P = params.get("tinylora_A"), params.get("tinylora_B"), params.get("tinylora_P")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] \
                or A.shape[0] > rank or P.shape != (u, A.shape[0], A.shape[0]):
            raise _fail(f"module '{path}' needs tinylora_A (r x in), tinylora_B (out x r) and tinylora_P (u x r x r) "
                        f"with r <= {rank}, u = {u}, got {_shape(A)}, {_shape(B)} and {_shape(P)}")
    from .tinylora import layout

    entry = {"type": "tinylora", "rank": rank, "u": u, "weight_tying": float(tying), "projection_seed": seed,
             "init": TINYLORA_INITS[init], "init_bound": float(config.get("init_v_bound", 0.02)),
             "dropout": _dropout(config, "tinylora_dropout")}
    layers = _tinylora_layers(weights, rank, u, seed)
    order = sorted(weights, key=layers.get)
    sites = dict(zip(order, layout(entry, [(path, 0, 0) for path in order])))
    groups = {site["group"] for site in sites.values()}
    if set(extras) != {f"tinylora_v.{g}" for g in groups}:
        raise _fail(f"the checkpoint holds {sorted(extras)}, but {len(weights)} modules with weight_tying={tying} "
                    f"make {len(groups)} groups (tinylora_v.0 .. tinylora_v.{len(groups) - 1})")
    for path, params in weights.items():
        vector = extras[f"tinylora_v.{sites[path]['group']}"]
        if tuple(vector.shape) != (u,):
            raise _fail(f"tinylora_v.{sites[path]['group']} has shape {_shape(vector)}, expected [{u}] (u)")
        params["tinylora_v"] = vector
    return entry, sites


def _write_tinylora(kind, options, weights, site_options):
    """Every module's A, B and P, one tinylora_v per group: the sites' layer indices must be 0..N-1 and their
    groups PEFT's rule for N modules (PEFT re-derives them from its own module order when it loads)."""
    from .tinylora import layout

    sites = {path: {**options, **site_options.get(path, {})} for path in weights}
    order = sorted(weights, key=lambda path: sites[path].get("layer") if sites[path].get("layer") is not None else -1)
    expected = layout(options, [(path, 0, 0) for path in order])
    for path, want in zip(order, expected):
        got = {key: sites[path].get(key) for key in want}
        if got != want:
            raise _fail(f"TinyLoRA module '{path}' has layer/group {got}, but PEFT gives the module at that place of "
                        f"{len(order)} with weight_tying={options['weight_tying']} {want}")
    extras = {}
    for path in order:
        extras.setdefault(f"tinylora_v.{sites[path]['group']}", weights[path].pop("tinylora_v"))
    config = {"r": options["rank"], "u": options["u"], "weight_tying": options["weight_tying"],
              "projection_seed": options["projection_seed"], "save_projection": True,
              "init_weights": True if options["init"] == "zeros" else "uniform", "init_v_bound": options["init_bound"],
              "tinylora_dropout": options.get("dropout", 0.0)}
    return config, extras


def _read_unilora(config, weights, extras):
    """Per module unilora_indices_A / _scales_A (r x in) and unilora_indices_B / _scales_B (out x r); one
    unilora_theta_d (d) at the model level. PEFT saves the indices only with save_indices=True; without them
    they are a numpy stream over every targeted module in PEFT's order, which surgeon does not regenerate."""
    theta = extras.get("unilora_theta_d")
    if theta is None or theta.dim() != 1:
        raise _fail(f"the checkpoint needs the model-level unilora_theta_d (a vector), got {_shape(theta)}")
    if not weights:
        raise _fail("the checkpoint holds unilora_theta_d but no module's indices (save_indices=False): surgeon "
                    "does not regenerate PEFT's index stream; save the adapter with save_indices=True")
    rank = _positive_int("r", config.get("r", 4))
    if config.get("theta_d_length", theta.numel()) != theta.numel():
        raise _fail(f"adapter_config.json: theta_d_length={config['theta_d_length']!r} disagrees with "
                    f"unilora_theta_d of {theta.numel()} values")
    for path, params in weights.items():
        shapes = {name: _shape(params.get(name)) for name in ("unilora_indices_A", "unilora_scales_A",
                                                              "unilora_indices_B", "unilora_scales_B")}
        A, B = params.get("unilora_indices_A"), params.get("unilora_indices_B")
        fits = A is not None and B is not None and A.dim() == 2 and B.dim() == 2 and A.shape[0] == rank \
            and B.shape[1] == rank and shapes["unilora_scales_A"] == list(A.shape) \
            and shapes["unilora_scales_B"] == list(B.shape) and not A.is_floating_point() \
            and not B.is_floating_point()
        if not fits:
            raise _fail(f"module '{path}' needs integer unilora_indices_A (r x in) and unilora_indices_B (out x r) with "
                        f"r={rank} and scales of the same shapes, got {shapes}")
        if min(int(A.min()), int(B.min())) < 0 or max(int(A.max()), int(B.max())) >= theta.numel():
            raise _fail(f"module '{path}': indices point past unilora_theta_d's {theta.numel()} values")
        params.update(unilora_indices_A=A.long(), unilora_indices_B=B.long(), unilora_theta_d=theta)
    seed = config.get("proj_seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: proj_seed must be an integer, got {seed!r}")
    config = {"init_theta_d_bound": 0.02, **config}
    _number(config, "init_theta_d_bound")
    return {"type": "unilora", "rank": rank, "theta_length": theta.numel(), "projection_seed": seed,
            "init": "uniform" if config.get("init_weights", True) else "normal",
            "init_bound": float(config["init_theta_d_bound"]), "dropout": _dropout(config, "unilora_dropout")}, {}


def _write_unilora(kind, options, weights, site_options):
    """Indices and scales per module (save_indices=True: PEFT loads them instead of drawing its own), theta once."""
    ranks = {params["unilora_indices_A"].shape[0] for params in weights.values()}
    if ranks != {options["rank"]}:
        raise _fail(f"PEFT's Uni-LoRA config holds one r; these modules have ranks {sorted(ranks)}")
    thetas = [params.pop("unilora_theta_d") for params in weights.values()]
    if any(other is not thetas[0] and not torch.equal(other, thetas[0]) for other in thetas):
        raise _fail("the modules hold different theta vectors; PEFT's Uni-LoRA shares one")
    return {"r": options["rank"], "theta_d_length": options["theta_length"], "proj_seed": options["projection_seed"],
            "init_weights": options["init"] == "uniform", "init_theta_d_bound": options["init_bound"],
            "unilora_dropout": options.get("dropout", 0.0), "save_indices": True}, {"unilora_theta_d": thetas[0]}


# ---------------------------------------------------------------- OSF

def _read_osf(config, weights, extras):
    """U_low (out x m), S_low (m) and V_low (m x in) per module; each module's effective rank is
    min(in, out) - m, read from its tensors (PEFT's effective_rank and rank_pattern resolve to it). PEFT
    saves none of the frozen SVD parts: insert rebuilds them from the base weight, as PEFT does."""
    rank = config.get("effective_rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0):
        raise _fail(f"adapter_config.json: effective_rank must be a positive number or null, got {rank!r}")
    ranks = {}
    for path, params in weights.items():
        U, S, V = params.get("osf_U"), params.get("osf_S"), params.get("osf_V")
        if U is None or S is None or V is None or U.dim() != 2 or S.dim() != 1 or V.dim() != 2 \
                or not U.shape[1] == S.shape[0] == V.shape[0] or min(U.shape[0], V.shape[1]) <= S.shape[0]:
            raise _fail(f"module '{path}' needs osf_svd_params U_low (out x m), S_low (m) and V_low (m x in) with m "
                        f"below min(in, out), got {_shape(U)}, {_shape(S)} and {_shape(V)}")
        ranks[path] = min(U.shape[0], V.shape[1]) - S.shape[0]
    entry = {"type": "osf", "effective_rank": rank, "init": "default"}
    return entry, {path: {"effective_rank": k} for path, k in ranks.items() if k != rank}


def _write_osf(kind, options, weights, site_options):
    """effective_rank, and a rank_pattern entry (PEFT matches it with re.search) for every module whose rank
    the adapter-wide value does not give."""
    from .osf import resolve_rank

    pattern = {}
    for path, params in weights.items():
        out_features, m = params["osf_U"].shape
        in_features = params["osf_V"].shape[1]
        k = min(in_features, out_features) - m
        if resolve_rank(options["effective_rank"], in_features, out_features) != k:
            pattern[rf"(^|\.){re.escape(path)}$"] = k
        for name in ("osf_U0", "osf_S0", "osf_V0", "osf_U_high", "osf_V_high"):
            del params[name]   # PEFT rebuilds them from the base weight
    return {"effective_rank": options["effective_rank"], "rank_pattern": pattern, "init_weights": True}, {}


def _read_frod(config, weights, extras):
    """frod_lambda_l (in) and frod_lambda_s_values (nnz) per module; V (in x in) and S's positions (2 x nnz)
    per module role at the model level (save_projection=True), given to every module of the role."""
    from .frod import role, sparse_count

    if not config.get("save_projection", True):
        raise _fail("save_projection=False: the checkpoint holds no frod_V / frod_s_indices, and PEFT rebuilds them "
                    "from every targeted base weight of a module role; surgeon reads them from the checkpoint "
                    "(re-save the adapter with save_projection=True)")
    seed = config.get("projection_prng_key", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"adapter_config.json: projection_prng_key must be an integer, got {seed!r}")
    config = {**config, "sparse_rate": config.get("sparse_rate", 0.01),
              "regularization_alpha": config.get("regularization_alpha", 1e-3)}
    _number(config, "sparse_rate", "regularization_alpha")
    rate = float(config["sparse_rate"])
    if not 0.0 <= rate <= 1.0:
        raise _fail(f"adapter_config.json: sparse_rate must be in [0, 1], got {rate!r}")
    for path, params in weights.items():
        lam, values, name = params.get("frod_lambda_l"), params.get("frod_lambda_s_values"), role(path)
        if lam is None or values is None or lam.dim() != 1 or values.dim() != 1:
            raise _fail(f"module '{path}' needs 1-D frod_lambda_l and frod_lambda_s_values, got {_shape(lam)} and "
                        f"{_shape(values)}")
        size, count = lam.numel(), sparse_count(lam.numel(), rate)
        v, at, dims = (extras.get(f"{key}.{name}") for key in ("frod_V", "frod_s_indices", "frod_s_size"))
        if v is None or at is None:
            raise _fail(f"module '{path}' (role '{name}') has no frod_V.{name} / frod_s_indices.{name} in the "
                        "checkpoint")
        if tuple(v.shape) != (size, size) or tuple(at.shape) != (2, count) or values.numel() != count or \
                at.is_floating_point() or (count and not 0 <= int(at.min()) <= int(at.max()) < size) or \
                (dims is not None and dims.tolist() != [size, size]):
            raise _fail(f"module '{path}' (role '{name}'): frod_V must be {size} x {size}, frod_s_indices 2 x {count} "
                        f"integers below {size} and frod_lambda_s_values {count} long (sparse_rate={rate}), got "
                        f"{_shape(v)}, {_shape(at)} and {_shape(values)}")
        params.update(frod_V=v, frod_s_indices=at.long())
    return {"type": "frod", "sparse_rate": rate, "projection_seed": seed,
            "regularization": float(config["regularization_alpha"]), "init": "default",
            "dropout": _dropout(config, "frod_dropout")}, {}


def _write_frod(kind, options, weights, site_options):
    """V and S's positions go out once per module role, as PEFT keeps them: the modules of a role must
    share them (an imported adapter does; a surgeon-made one builds them per module)."""
    from .frod import role

    extras, held = {}, {}
    for path, params in weights.items():
        name = role(path)
        v, at = params.pop("frod_V"), params.pop("frod_s_indices")
        if name in held and not (torch.equal(held[name][1], v) and torch.equal(held[name][2], at)):
            raise _fail(f"modules '{held[name][0]}' and '{path}' share PEFT's module role '{name}', which PEFT gives "
                        "one frod_V and one S pattern, but their V or S positions differ (surgeon builds them per "
                        "module); export an adapter with one module per role, or one imported from PEFT")
        held.setdefault(name, (path, v, at))
        extras.update({f"frod_V.{name}": v, f"frod_s_indices.{name}": at,
                       f"frod_s_size.{name}": torch.tensor(list(v.shape), dtype=torch.long)})
    return {"projection_prng_key": options["projection_seed"], "save_projection": True,
            "sparse_rate": options["sparse_rate"], "regularization_alpha": options["regularization"],
            "frod_dropout": options.get("dropout", 0.0), "init_weights": True, "progressbar": False,
            "runtime_offload_base_weight": False}, extras


# ---------------------------------------------------------------- Lily

def _lily_suffix(targets, path: str) -> str | None:
    """The target_modules entry PEFT ties a module's B by: the regex string itself, or the longest list entry
    the path ends with (PEFT takes the last match of a set's order; the longest is the one it means)."""
    if isinstance(targets, str):
        return targets
    return max((t for t in targets or () if path.endswith(t)), key=len, default=None)


def _read_lily(config, weights, extras):
    """lily_A (r x in), lily_router (num_B x r) and lily_B ((num_B r) x out) per module. PEFT ties B across
    the modules of one (target_modules entry, weight shape) and saves it under each: those copies must be
    equal, and become one shared B per group (site options `group`, `width`). stride_A > 1 is refused."""
    _number({**config, "scaling": config.get("scaling", 1.0)}, "scaling")
    rank, experts = _positive_int("r", config.get("r", 32)), _positive_int("num_B", config.get("num_B", 2))
    if config.get("stride_A", 1) != 1:
        raise _fail(f"adapter_config.json: stride_A={config['stride_A']!r}: surgeon's lily shares B by group and "
                    "keeps one A per module (stride_A 1); sharing A by blocks of modules too is not supported")
    groups: dict[tuple, tuple[int, str]] = {}
    sites = {}
    for path in sorted(weights):
        params = weights[path]
        A, B, R = params.get("lily_A"), params.get("lily_B"), params.get("lily_router")
        if A is None or B is None or R is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank \
                or B.shape[0] != experts * rank or tuple(R.shape) != (experts, rank):
            raise _fail(f"module '{path}' needs lily_A (r x in), lily_B (num_B r x out) and lily_router (num_B x r) "
                        f"with r={rank}, num_B={experts}, got {_shape(A)}, {_shape(B)} and {_shape(R)}")
        suffix = _lily_suffix(config.get("target_modules"), path)
        group, first = groups.setdefault((suffix, A.shape[1], B.shape[1]), (len(groups), path))
        if not torch.equal(B, weights[first]["lily_B"]):
            raise _fail(f"module '{path}': lily_B differs from module '{first}''s, which PEFT ties to it (target "
                        f"{suffix!r}, the same shape)")
        sites[path] = {"group": group, "width": B.shape[1]}
    entry = {"type": "lily", "rank": rank, "num_b": experts, "scaling": float(config.get("scaling", 1.0)),
             "init": "default"}
    return entry, sites


def _write_lily(kind, options, weights, site_options):
    """target_modules as one regex of exactly the adapter's modules, so PEFT adapts those and ties B by weight
    shape alone: groups that share a shape would become one, and are refused."""
    shapes: dict[tuple, int] = {}
    for path, params in weights.items():
        group = site_options.get(path, {}).get("group", options.get("group"))
        shape = (params["lily_A"].shape[1], params["lily_B"].shape[1])
        if shapes.setdefault(shape, group) != group:
            raise _fail(f"PEFT ties Lily's B by (target_modules, weight shape), and the exact target_modules surgeon "
                        f"writes is one regex, so it would tie groups {shapes[shape]} and {group} (both {shape[0]} -> "
                        f"{shape[1]}) into one; export them as separate adapters")
    return {"r": options["rank"], "num_B": options["num_b"], "stride_A": 1, "scaling": options["scaling"],
            "target_modules": "^(?:" + "|".join(re.escape(path) for path in sorted(weights)) + ")$",
            "init_weights": True}, {}


# ---------------------------------------------------------------- adaption prompt (LLaMA-Adapter)

def _read_adaption_prompt(config, weights, extras):
    """One adaption_prompt (1 x adapter_len x hidden) and adaption_gate (1) per adapted attention module:
    PEFT's top adapter_layers ones, which the keys name (the adapter targets those paths)."""
    n = _positive_int("adapter_len", config.get("adapter_len"))
    layers = _positive_int("adapter_layers", config.get("adapter_layers"))
    if len(weights) != layers:
        raise _fail(f"adapter_layers={layers}, but the checkpoint holds adaption prompts for {len(weights)} "
                    f"modules: {sorted(weights)}")
    target = config.get("target_modules")
    for path, params in weights.items():
        prompt, gate = params.get("adaption_prompt"), params.get("adaption_gate")
        if prompt is None or prompt.dim() != 3 or prompt.shape[:2] != (1, n):
            raise _fail(f"module '{path}' needs an adaption_prompt of shape [1, adapter_len={n}, hidden], got "
                        f"{_shape(prompt)}")
        if gate is None or gate.numel() != 1:
            raise _fail(f"module '{path}' needs a one-element adaption_gate, got {_shape(gate)}")
        if isinstance(target, str) and path.rpartition(".")[2] != target:
            raise _fail(f"module '{path}' is not a '{target}' module (the config's target_modules)")
        params["adaption_gate"] = gate.reshape(1)
    return {"type": "adaption_prompt", "adapter_len": n}, {}


def _write_adaption_prompt(kind, options, weights, site_options):
    """PEFT adapts the top adapter_layers attention modules (named target_modules): the sites must be
    those, the last L attention calls of the graph (their layer_from_top 0 .. L-1), all of one name."""
    from_top = sorted(site_options.get(path, {}).get("layer_from_top", -1) for path in weights)
    if from_top != list(range(len(weights))):
        raise _fail(f"PEFT's adaption prompt adapts the top adapter_layers attention modules; these sites are "
                    f"{from_top} from the top (0: the last), not the top {len(weights)}")
    names = {path.rpartition(".")[2] for path in weights}
    if len(names) != 1:
        raise _fail(f"PEFT's target_modules names one attention module; these sites are named {sorted(names)}")
    return {"task_type": "CAUSAL_LM", "target_modules": names.pop(), "adapter_len": options["adapter_len"],
            "adapter_layers": len(weights), "inference_mode": True}, {}


def _read_poly(config, weights, extras):
    """poly_lora_A (n_splits x n_skills x in/n_splits x r), poly_lora_B (n_splits x n_skills x r x out/n_splits)
    and the router's module_logits (n_tasks x n_splits n_skills) per module. PEFT builds every module with the
    config's r, n_tasks, n_skills and n_splits (no patterns), so the tensors must have them. The import routes
    by each call's task_ids, as PEFT does (routing: rows)."""
    if config.get("poly_type", "poly") != "poly":
        raise _fail(f"adapter_config.json: poly_type {config.get('poly_type')!r} is not one PEFT has ('poly')")
    rank = _positive_int("r", config.get("r", 8))
    tasks = _positive_int("n_tasks", config.get("n_tasks", 1))
    skills = _positive_int("n_skills", config.get("n_skills", 4))
    splits = _positive_int("n_splits", config.get("n_splits", 1))
    for path, params in weights.items():
        A, B, Z = params.get("poly_lora_A"), params.get("poly_lora_B"), params.get("poly_router")
        if A is None or B is None or Z is None or A.dim() != 4 or B.dim() != 4 \
                or tuple(A.shape[:2]) != (splits, skills) or A.shape[3] != rank \
                or tuple(B.shape[:3]) != (splits, skills, rank) or tuple(Z.shape) != (tasks, splits * skills):
            raise _fail(f"module '{path}' needs poly_lora_A (n_splits x n_skills x in/n_splits x r), poly_lora_B "
                        f"(n_splits x n_skills x r x out/n_splits) and poly_router.module_logits (n_tasks x n_splits "
                        f"n_skills) with r={rank}, n_tasks={tasks}, n_skills={skills}, n_splits={splits}, got "
                        f"{_shape(A)}, {_shape(B)} and {_shape(Z)}")
    entry = {"type": "poly", "rank": rank, "n_tasks": tasks, "n_skills": skills, "n_splits": splits,
             "routing": "rows", "task_id": 0, "init": "default"}
    return entry, {}


def _write_poly(kind, options, weights, site_options):
    """The inventory and routing logits as PEFT's; a fixed routing (task, mu, task_mean) is surgeon's setting:
    PEFT routes each call by the task_ids it is given."""
    return {"r": options["rank"], "n_tasks": options["n_tasks"], "n_skills": options["n_skills"],
            "n_splits": options["n_splits"], "poly_type": "poly", "init_weights": True}, {}


# ---------------------------------------------------------------- prompt tuning

def _decoder_prompt(config, what: str) -> tuple[int, int]:
    """(num_virtual_tokens, token_dim) of a virtual-token config, refused unless it is PEFT's one-stack form (one
    transformer submodule, task_type CAUSAL_LM, FEATURE_EXTRACTION (an encoder such as BertModel) or none)."""
    if config.get("num_transformer_submodules", 1) != 1:
        raise _fail(f"{what} of an encoder-decoder (num_transformer_submodules=2) is not supported")
    if config.get("task_type") not in (None, "CAUSAL_LM", "FEATURE_EXTRACTION"):
        raise _fail(f"{what} with task_type={config.get('task_type')!r}: surgeon follows PEFT's CAUSAL_LM and "
                    "FEATURE_EXTRACTION paths only")
    _number(config, "num_virtual_tokens", "token_dim")
    return config["num_virtual_tokens"], config["token_dim"]


def _read_prompt_tuning(config, weights, extras):
    """PEFT's prompt_embeddings (num_virtual_tokens x token_dim) for a decoder (one transformer submodule):
    the one site, '#0', is the input embedding the adapter targets ('*': the one embedding op; name it,
    e.g. 'transformer.wte', where the model has more). TEXT checkpoints hold trained rows like any other."""
    n, dim = _decoder_prompt(config, "prompt tuning")
    table = extras.get("prompt_embeddings")
    if table is None or tuple(table.shape) != (n, dim):
        raise _fail(f"prompt_embeddings of shape {None if table is None else list(table.shape)} does not fit "
                    f"num_virtual_tokens={n} x token_dim={dim}")
    weights["#0"] = {"prompt_embeddings": table}
    return {"type": "prompt_tuning", "num_virtual_tokens": n, "targets": ["*"]}, {}


def _write_prompt_tuning(kind, options, weights, site_options):
    if len(weights) != 1:
        raise _fail(f"PEFT's prompt tuning holds one prompt table; this adapter has {len(weights)} sites")
    (params,) = weights.values()
    table = params["prompt_embeddings"]
    weights.clear()
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": int(table.shape[0]), "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", "inference_mode": True}, \
        {"prompt_embeddings": table}


def _read_p_tuning(config, weights, extras):
    """PEFT saves P-tuning's encoded prompt only (prompt_embeddings, the MLP's or LSTM's output) and loads it
    without the encoder: it imports as a prompt_tuning adapter holding that prompt, the same function."""
    return _read_prompt_tuning(config, weights, extras)


def _write_p_tuning(kind, options, weights, site_options):
    """The encoder's output as prompt_embeddings, in P_TUNING's config (PEFT loads it as the prompt)."""
    from .p_tuning import encoder_size, prompt

    if len(weights) != 1:
        raise _fail(f"PEFT's P-tuning holds one prompt table; this adapter has {len(weights)} sites")
    (params,) = weights.values()
    table = prompt(params).detach()
    weights.clear()
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": int(table.shape[0]), "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1, "encoder_reparameterization_type": "MLP",
            "encoder_hidden_size": encoder_size(options, int(table.shape[1])), "inference_mode": True}, \
        {"prompt_embeddings": table}


def _read_multitask_prompt_tuning(config, weights, extras):
    """PEFT's shared prompt_embeddings (v x token_dim) and per-task factors prefix_task_cols (num_tasks x v x
    num_ranks) and prefix_task_rows (num_tasks x num_ranks x token_dim), for a decoder, on the one site '#0' (the
    input embedding, as prompt tuning's). Any prompt_tuning_init: the checkpoint holds the trained tensors."""
    n, dim = _decoder_prompt(config, "multitask prompt tuning")
    tasks = _positive_int("num_tasks", config.get("num_tasks", 1))
    ranks = _positive_int("num_ranks", config.get("num_ranks", 1))
    shapes = {"prompt_embeddings": ((n, dim), f"num_virtual_tokens={n} x token_dim={dim}"),
              "prefix_task_cols": ((tasks, n, ranks), f"num_tasks={tasks} x num_virtual_tokens={n} x num_ranks={ranks}"),
              "prefix_task_rows": ((tasks, ranks, dim), f"num_tasks={tasks} x num_ranks={ranks} x token_dim={dim}")}
    for name, (shape, words) in shapes.items():
        tensor = extras.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            raise _fail(f"{name} of shape {None if tensor is None else list(tensor.shape)} does not fit {words}")
    weights["#0"] = {name: extras[name] for name in shapes}
    return {"type": "multitask_prompt_tuning", "num_virtual_tokens": n, "num_tasks": tasks, "num_ranks": ranks,
            "targets": ["*"]}, {}


def _write_multitask_prompt_tuning(kind, options, weights, site_options):
    if len(weights) != 1:
        raise _fail(f"PEFT's multitask prompt tuning holds one prompt; this adapter has {len(weights)} sites")
    (params,) = weights.values()
    table, cols = params["prompt_embeddings"], params["prefix_task_cols"]
    weights.clear()
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": int(table.shape[0]), "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", "num_tasks": int(cols.shape[0]),
            "num_ranks": int(cols.shape[2]), "inference_mode": True}, \
        {name: params[name] for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")}


def _read_cpt(config, weights, extras):
    """PEFT saves CPT's prompt only (prompt_embeddings: the tokens' embeddings plus their projected offsets) and
    loads it as the prompt with zero offsets: it imports as a prompt_tuning adapter holding that prompt, the same
    function (the type mask and epsilons shape training only)."""
    return _read_prompt_tuning(config, weights, extras)


def _write_cpt(kind, options, weights, site_options):
    """The prompt E + Π(D) as prompt_embeddings, in CPT's config (PEFT loads it as the prompt)."""
    from .cpt import prompt, type_mask

    if len(weights) != 1:
        raise _fail(f"PEFT's CPT holds one prompt table; this adapter has {len(weights)} sites")
    (params,) = weights.values()
    table = prompt(params, options).detach()
    weights.clear()
    ids = list(options["cpt_token_ids"])
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": len(ids), "token_dim": int(table.shape[1]),
            "num_transformer_submodules": 1, "cpt_token_ids": ids, "cpt_mask": [1] * len(ids),
            "cpt_tokens_type_mask": type_mask(options), "opt_projection_epsilon": options["opt_projection_epsilon"],
            "opt_projection_format_epsilon": options["opt_projection_format_epsilon"], "inference_mode": True}, \
        {"prompt_embeddings": table}


FORMATS = [
    PeftFormat("LORA", ("lora", "dora"), {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                                          "lora_bias": "lora_B.bias",
                                          "lora_magnitude": "lora_magnitude_vector"}, _read_lora, _write_lora),
    PeftFormat("IA3", ("ia3",), {"ia3_l": "ia3_l"}, _read_ia3, _write_ia3, ("fan_in_fan_out",)),
    PeftFormat("LOHA", ("loha",), {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
               _read_loha, _write_lycoris, ()),
    PeftFormat("LOKR", ("lokr",), {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                  "lokr_w2_b")}, _read_lokr, _write_lycoris, ()),
    PeftFormat("VERA", ("vera",), {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"},
               _read_vera, _write_vera, model_level=("vera_A", "vera_B")),
    PeftFormat("OFT", ("oft",), {"oft_R": "oft_R.weight"}, _read_oft, _write_oft),
    PeftFormat("BOFT", ("boft",), {"boft_R": "boft_R", "boft_s": "boft_s"}, _read_boft, _write_boft),
    PeftFormat("HRA", ("hra",), {"hra_u": "hra_u"}, _read_hra, _write_hra, ("bias",)),
    PeftFormat("PREFIX_TUNING", ("prefix",), {}, _read_prefix, _write_prefix, (), ("prompt_embeddings",), ""),
    PeftFormat("CARTRIDGE", (), {}, _read_cartridge, _write_prefix, (), ("prompt_embeddings",), ""),   # export: prefix
    PeftFormat("SHIRA", ("shira",), {"shira_values": "shira_weight", "shira_indices": "shira_indices"},
               _read_shira, _write_shira, ("fan_in_fan_out",)),
    PeftFormat("ROAD", ("road",), {"road_theta": "road_theta", "road_alpha": "road_alpha"}, _read_road, _write_road,
               ()),
    PeftFormat("FOURIERFT", ("fourierft",), {"fourierft_spectrum": "fourierft_spectrum"}, _read_fourierft,
               _write_fourierft),
    PeftFormat("HIRA", ("hira",), {"hira_A": "hira_A", "hira_B": "hira_B"}, _read_hira, _write_hira,
               ("fan_in_fan_out",)),
    PeftFormat("MISS", ("miss",), {"miss_block": "miss_block"}, _read_miss, _write_miss, ("bias",)),
    PeftFormat("RANDLORA", ("randlora",), {n: n for n in ("randlora_lambda", "randlora_gamma", "randlora_A",
                                                           "randlora_B")}, _read_randlora, _write_randlora,
               model_level=("randlora_A", "randlora_B")),
    PeftFormat("DELORA", ("delora",), {n: n for n in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")},
               _read_delora, _write_delora, ("bias",)),
    PeftFormat("GRALORA", ("gralora",), {"gralora_A": "gralora_A", "gralora_B": "gralora_B",
                                         "gralora_A_general": "gralora_A_general.weight",
                                         "gralora_B_general": "gralora_B_general.weight"}, _read_gralora,
               _write_gralora),
    PeftFormat("C3A", ("c3a",), {"c3a_kernel": "c3a_kernel"}, _read_c3a, _write_c3a, ("bias",)),
    PeftFormat("PVERA", ("pvera",), {"pvera_lambda_b": "pvera_lambda_b", "pvera_lambda_d": "pvera_lambda_d"},
               _read_pvera, _write_pvera, model_level=("pvera_A", "pvera_B")),
    PeftFormat("ADALORA", ("adalora",), {"adalora_A": "lora_A", "adalora_B": "lora_B", "adalora_E": "lora_E"},
               _read_adalora, _write_adalora),
    PeftFormat("PEANUT", ("peanut",), {"peanut_A": "peanut_A.weight", "peanut_B": "peanut_B.weight",
                                       **{f"peanut_{side}coder_{i}": f"peanut_{side}coders.{i}.weight"
                                          for side in ("en", "de") for i in range(32)}},   # peanut.MAX_DEPTH
               _read_peanut, _write_peanut, ()),
    PeftFormat("SUPERTUNING", ("supertuning",), {"supertuning_values": "supertuning_values",
                                                 "supertuning_indices": "supertuning_indices",
                                                 "supertuning_A": "supertuning_lora_A.weight",
                                                 "supertuning_B": "supertuning_lora_B.weight"},
               _read_supertuning, _write_supertuning, ()),
    PeftFormat("BEFT", ("beft",), {"beft_bias": "beft_bias"}, _read_beft, _write_beft, ()),
    PeftFormat("ADAMSS", ("adamss",), ADAMSS_NAMES, _read_adamss, _write_adamss, ()),
    PeftFormat("WAVEFT", ("waveft",), {"waveft_spectrum": "waveft_spectrum"}, _read_waveft, _write_waveft),
    PeftFormat("PSOFT", ("psoft",), {"psoft_R": "psoft_R.weight", "psoft_vector_a": "psoft_R.vector_a",
                                     "psoft_vector_b": "psoft_R.vector_b"}, _read_psoft, _write_psoft,
               ("fan_in_fan_out",)),
    PeftFormat("DEFT", ("deft",), {"deft_P": "deft_P", "deft_R": "deft_R"}, _read_deft, _write_deft),
    PeftFormat("OSF", ("osf",), {"osf_U": "osf_svd_params.U_low", "osf_S": "osf_svd_params.S_low",
                                 "osf_V": "osf_svd_params.V_low"}, _read_osf, _write_osf, ()),
    PeftFormat("GLORA", ("glora",), {f"glora_{letter}_{tensor}": f"glora_{letter}.{tensor}" for letter in "ABCDE"
                                     for tensor in ("Xd", "Xu", "X", "zeros")}, _read_glora, _write_glora, ("bias",)),
    PeftFormat("LILY", ("lily",), {n: f"{n}.weight" for n in ("lily_A", "lily_B", "lily_router")}, _read_lily,
               _write_lily, ()),
    PeftFormat("LN_TUNING", ("ln_tuning",), {"ln_tuning_weight": "ln_tuning_layers.weight",
                                             "ln_tuning_bias": "ln_tuning_layers.bias"},
               _read_ln_tuning, _write_ln_tuning, ()),
    PeftFormat("TRAINABLE_TOKENS", ("trainable_tokens",), {"trainable_tokens_delta": "trainable_tokens_delta"},
               _read_trainable_tokens, _write_trainable_tokens, ()),
    PeftFormat("VBLORA", ("vblora",), {n: n for n in ("vblora_logits_A", "vblora_logits_B", "vblora_logits_A_topk_indices",
                                                      "vblora_logits_A_topk_weights", "vblora_logits_B_topk_indices",
                                                      "vblora_logits_B_topk_weights")},
               _read_vblora, _write_vblora, model_level=("vblora_vector_bank",)),
    PeftFormat("TINYLORA", ("tinylora",), {n: n for n in ("tinylora_A", "tinylora_B", "tinylora_P")},
               _read_tinylora, _write_tinylora, model_level=("tinylora_v.N",)),
    PeftFormat("UNILORA", ("unilora",), {n: n for n in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A",
                                                        "unilora_scales_B")},
               _read_unilora, _write_unilora, model_level=("unilora_theta_d",)),
    PeftFormat("FROD", ("frod",), {"frod_lambda_l": "frod_lambda_l", "frod_lambda_s_values": "frod_lambda_s_values"},
               _read_frod, _write_frod, model_level=("frod_V.*", "frod_s_indices.*", "frod_s_size.*")),
    PeftFormat("ADAPTION_PROMPT", ("adaption_prompt",), {"adaption_prompt": "adaption_prompt",
                                                         "adaption_gate": "adaption_gate"},
               _read_adaption_prompt, _write_adaption_prompt, ()),
    PeftFormat("POLY", ("poly",), {"poly_lora_A": "poly_lora_A", "poly_lora_B": "poly_lora_B",
                                   "poly_router": "poly_router.module_logits"}, _read_poly, _write_poly, ()),
    PeftFormat("PROMPT_TUNING", ("prompt_tuning",), {}, _read_prompt_tuning, _write_prompt_tuning, (),
               ("prompt_embeddings",), ""),
    PeftFormat("P_TUNING", ("p_tuning",), {}, _read_p_tuning, _write_p_tuning, (), ("prompt_embeddings",), ""),
    PeftFormat("MULTITASK_PROMPT_TUNING", ("multitask_prompt_tuning",), {}, _read_multitask_prompt_tuning,
               _write_multitask_prompt_tuning, (), ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"), ""),
    PeftFormat("CPT", ("cpt",), {}, _read_cpt, _write_cpt, (), ("prompt_embeddings",), ""),
]
BY_PEFT_TYPE = {f.peft_type: f for f in FORMATS}
BY_KIND = {kind: f for f in FORMATS for kind in f.kinds}
