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

LORA_INITS = (True, False, "gaussian", "pissa", "olora", "eva", "orthogonal")   # leave W alone, or PiSSA / OLoRA


def _read_lora(config, weights, extras):
    init = config.get("init_lora_weights", True)
    if init not in LORA_INITS:
        raise _fail(f"init_lora_weights={init!r} changes the base weights in a way surgeon does not reproduce "
                    f"(supported: {list(LORA_INITS)}; PiSSA only with the full SVD)")
    residual = init if init in ("pissa", "olora") else None   # the base holds W - s B0 A0, recomputed from W
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
    experts = {path: site_options[path]["experts"] for path in weights if "experts" in site_options.get(path, {})}
    ranks = _write_rank_alpha(options, weights, site_options, "lora_alpha",
                              lambda params: params["lora_A"].shape[0], experts)
    config = {**ranks, "use_rslora": options["use_rslora"], "lora_bias": bool(options.get("bias", False)),
              "lora_dropout": options.get("dropout", 0.0), "use_dora": kind == "dora",
              "init_lora_weights": options["init"] if options.get("init") in ("pissa", "olora") else True}
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


def _write_prefix(kind, options, weights, site_options):
    """One table from the sites in the adapter's order (insert orders sites by graph position)."""
    shapes = {tuple(t.shape) for params in weights.values() for t in params.values()}
    if len(shapes) != 1:
        raise _fail(f"PEFT's prefix table holds one (kv_heads, n, head_dim) per layer; these sites use "
                    f"{sorted(shapes)}")
    kv_heads, n, head_dim = shapes.pop()
    stacked = torch.stack([params[p] for params in weights.values() for p in ("prefix_k", "prefix_v")])
    table = stacked.permute(2, 0, 1, 3).reshape(n, -1)
    layers = len(weights)
    weights.clear()
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": n, "num_layers": layers, "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads, "num_transformer_submodules": 1, "prefix_projection": False,
            "encoder_hidden_size": kv_heads * head_dim, "inference_mode": True}, {"prompt_embeddings": table}


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
]
BY_PEFT_TYPE = {f.peft_type: f for f in FORMATS}
BY_KIND = {kind: f for f in FORMATS for kind in f.kinds}
