"""Where benchmarks/bench_kind_overhead.py puts each adapter kind on a LLaMA-shaped model, and with what options.

A kind that attaches to linear sites goes on the seven projections (surgeon.bench.models.TARGETS) with its
defaults, except:
- rank RANK where the kind has a `rank` (less where its rank_limit says a site of (in, out) takes less;
  DEFAULT_RANK lists the kinds that keep their default, and why);
- the shape options of FITS (the largest value up to the default that divides the sizes the kind's own check
  names on every site) and AT_MOST (at most a bound per site, e.g. FourierFT's frequencies <= in * out).
SETUPS gives every other kind its natural sites and the options, task ids and earlier passes it needs
(`Setup`); a kind with neither linear sites nor a SETUPS entry has a skip reason (`skip_reason`), so a new
kind of another site shows up as skipped rather than failing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models import TARGETS

RANK = 16
PROJECTIONS = "7 projections"


@dataclass(frozen=True)
class Setup:
    """Where a kind goes and what it is given beyond the fitted options (a kind not in SETUPS: its defaults on
    the 7 projections)."""

    sites: str                                            # what the table's sites column says
    targets: tuple[str, ...] = tuple(TARGETS)
    options: dict = field(default_factory=dict)
    before: tuple = ()                                    # passes run before insert
    task_ids: tuple[int, ...] | None = None               # held for every call (surgeon.routing.given)


ATTENTION, EMBEDDING = ("*.self_attn",), ("*.embed_tokens",)
VIRTUAL = "embed_tokens: 8 virtual tokens"
# S2FT trains the columns co-permute gathers first: a quarter of each FFN's channels. Heads are left out: on
# generate's KV-cache graphs co-permute has no rule through the cache writes (aten.index_copy_), so an o_proj site
# has no record there and generate would fall back to recomputing the sequence
PERMUTE = {"co-permute": {"ffn_fraction": 0.25}}
SETUPS = {
    "delta": Setup(f"{PROJECTIONS}, a dense in x out update each"),
    "s2ft": Setup("down_proj: the 1/4 of its input columns co-permute put first", ("*.down_proj",),
                  before=(PERMUTE,)),
    "prefix": Setup("every self_attn (its SDPA call)", ATTENTION),
    "adaption_prompt": Setup("every self_attn (its SDPA call)", ATTENTION),
    "ln_tuning": Setup("every RMSNorm (2 per layer, the final one)",
                       ("*.input_layernorm", "*.post_attention_layernorm", "*.norm")),
    "trainable_tokens": Setup("embed_tokens: 8 rows", EMBEDDING, {"token_indices": list(range(3, 11))}),
    **{name: Setup(VIRTUAL, EMBEDDING) for name in ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")},
    # 8 tokens as PEFT's types: template (1, 3) around input (2); they start as these tokens' embeddings
    "cpt": Setup(VIRTUAL, EMBEDDING, {"cpt_token_ids": list(range(3, 11)),
                                      "cpt_tokens_type_mask": [1, 1, 2, 2, 2, 2, 3, 3]}),
    "poly": Setup(f"{PROJECTIONS}, each call's task id (1 of 2) given", options={"n_tasks": 2}, task_ids=(1,)),
}

# the shape options a kind checks against every site (its own checks in surgeon/adapters/<kind>.py):
# option -> the sizes it must divide ("in", "out", "rank": the rank used here) and "even" where it must
# be even; the largest value up to the kind's default that passes on every site is used
FITS = {
    "oft": {"block_size": ("in",)},
    "boft": {"block_size": ("in",)},                 # with butterfly_factor 1, its default
    "c3a": {"block_size": ("in", "out")},
    "road": {"group_size": ("out", "even")},
    "gralora": {"blocks": ("in", "out", "rank")},
    "ether": {"blocks": ("in", "out")},
    "ether_plus": {"blocks": ("in", "out")},
    "vblora": {"vector_length": ("in", "out")},
}
# option -> at most this many on a site of (in, out): the least over the sites, where the default is more
AT_MOST = {"fourierft": {"frequencies": lambda fan_in, fan_out: fan_in * fan_out},
           "waveft": {"frequencies": lambda fan_in, fan_out: fan_in * fan_out}}
# kinds that keep their default rank, and why
DEFAULT_RANK = {"supertuning": "a rank adds a LoRA part (Supra); its default, Super, is measured"}


def site_dims(model) -> list[tuple[int, int]]:
    """(in, out) of every distinct linear site the targets name."""
    from surgeon.rules import path_matches

    return sorted({(m.in_features, m.out_features) for path, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(path_matches(path, t) for t in TARGETS)})


def skip_reason(kind) -> str:
    """Why this table leaves `kind` out, or ""."""
    if "linear" not in kind.site_ops and kind.name not in SETUPS:
        return f"its site ops ({', '.join(kind.site_ops)}) do not include aten.linear, and SETUPS has no sites for it"
    return ""


def _fits(value: int, needs: tuple[str, ...], dims: list[tuple[int, int]], rank: int | None) -> bool:
    """Whether `value` divides every size `needs` names on every site (and is even where it says so)."""
    sizes = [fan_in for fan_in, _ in dims] * ("in" in needs) + [fan_out for _, fan_out in dims] * ("out" in needs)
    sizes += [rank] if "rank" in needs and rank else []
    return all(s % value == 0 for s in sizes) and not ("even" in needs and value % 2)


def fitted_options(kind, dims: list[tuple[int, int]]) -> dict:
    """The options set for `kind` on sites of `dims` that differ from its defaults (see FITS, AT_MOST)."""
    defaults = {name: option.default for name, option in kind.options.items()}
    chosen = {"rank": RANK} if "rank" in defaults and kind.name not in DEFAULT_RANK else {}
    if chosen:
        limits = [limit[0] for fan_in, fan_out in dims
                  if (limit := kind.rank_limit({**defaults, **chosen}, fan_in, fan_out)) is not None]
        chosen["rank"] = min([RANK, *limits])
    for option, needs in FITS.get(kind.name, {}).items():
        default = defaults.get(option)
        if isinstance(default, int) and default > 0:
            value = next((v for v in range(default, 0, -1) if _fits(v, needs, dims, chosen.get("rank"))), default)
            chosen[option] = value
    for option, bound in AT_MOST.get(kind.name, {}).items():
        if isinstance(defaults.get(option), int):
            chosen[option] = min([defaults[option], *(bound(fan_in, fan_out) for fan_in, fan_out in dims)])
    return {name: value for name, value in chosen.items() if value != defaults.get(name)}
