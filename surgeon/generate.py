"""Generation: `generate` for the compiled module, as transformers' `generate` returns token ids.

`surgeon.compile` attaches a `Generator` to the module (`gm.meta["surgeon_generator"]`) when the
model generates; `SurgeonModule.generate` and `Compiled.generate` run it. Two ways to produce the
next token's logits, chosen per model:

- cache (a causal LM whose forward takes an attention cache, e.g. transformers' LLaMA, GPT-2,
  Mistral, Qwen2): two more graphs captured from the ORIGINAL model on the first call, a prefill
  graph (any batch, any prompt length) and a one-token decode graph, both over a preallocated
  KV cache that the graphs take as inputs and update in place (so one capture serves every batch
  size and every length, and the cache lives only as long as a `generate` call). The attention
  mask is an input too (left padding: positions come from it, `cumsum - 1`, as transformers
  computes them). On each graph the passes the compiled module has been through are replayed in
  order (the spec's pipeline, then every `Compiled.apply` / `set_active`); then every parameter
  and buffer with the same name is tied to the compiled module's own tensor object, so weights,
  trained adapters and merged weights are shared, not copied, and the adapter state kept outside
  the graph (parked and merged factors) is the compiled module's. Later `Compiled.apply` calls run
  on both graphs too. A pass never knows which graph it rewrites. Before the first use (and after
  each later pass) the cache path is checked against the compiled module's own full forward on the
  example: the prefill logits at the last position and one decode step must match. When the module
  moves to another dtype or device, the graphs are built again and moved as `.to` moves it.
- recompute (a model whose forward takes no cache, e.g. surgeon.models.tiny_llama): each new token
  runs the compiled module itself on the whole sequence so far (its dynamic shapes take every
  length); left-padded rows run unpadded, grouped by length. The report and `notes` say so. The
  cache path falls back to this too, with a note and a warning saying why, when its graphs cannot
  be captured or do not reproduce the compiled module.

Decoding follows transformers: greedy argmax, or sampling from the softmax of the logits after its
temperature, top-k and top-p warpers (`process_logits`, same order and semantics, defaults from the
model's generation_config, then transformers' own: top_k 50, top_p 1.0, temperature 1.0), drawn
with `torch.multinomial` from the global RNG or a given `torch.Generator`; rows that produced an
EOS token are padded with `pad_token_id` after it, and generation stops when all rows have.

Memory: the generator keeps a reference to the original model (to capture from it lazily). Its
parameters share storage with the compiled module's until a pass replaces them (a merge makes new
weights: then the original's remain as well); its buffers are its own. Once built, the two
generation graphs hold no weights of their own (all tied), only their graph code.

`adapter_names=[...]` (one adapter per prompt row, "__base__" for none: PEFT's mixed batch) runs the cache
path on mixed-batch copies of the prefill and decode graphs, given the rows' plan as their last input, and the
recompute paths on the compiled module with each row's name (surgeon.serving).

Encoder-decoder models (transformers' T5, BART: config.is_encoder_decoder) recompute: each new token runs
the compiled module itself (so every pass applied to it is in effect) on the prompt, its attention mask
(padding on either side) and the decoder's tokens so far, and takes the decoder's last position's logits
(`_EncoderDecoderRun`). `generate` returns what transformers' does for them: the decoder's tokens, from
`decoder_start_token_id` (the call's, else the generation config's, else its `bos_token_id`), so (batch,
1 + new); `max_length` counts those; the `forced_bos_token_id` / `forced_eos_token_id` of the call or the
generation config replace the first / last new token (BART sets the latter), as transformers' processors do.
The module must have been captured with a `decoder_input_ids` input of dynamic length; otherwise its
generator is "unsupported" and says how to compile it. No cache path yet: the encoder and the whole decoder
sequence run again for every token.
"""
from __future__ import annotations

import copy
import functools
import inspect
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .adapters.virtual_tokens import lengthening
from .adapters.xlora import recomputing
from .capture import capture
from .errors import InputError, SurgeonError
from .graph import first_device, placement
from .modes import evaluating
from . import routing
from .pipeline import AdapterState, Context, compare, compute_dtypes, run_pipeline

# transformers' global defaults (GenerationConfig._get_default_generation_params) for what we take
DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
KEYWORDS = ("input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k",
            "top_p", "eos_token_id", "pad_token_id", "generator", "use_cache", "generation_config", "adapter_names")
# what an encoder-decoder's generate takes as well
ENCODER_DECODER_KEYWORDS = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")


@dataclass(frozen=True)
class Settings:
    """One call's decoding settings, resolved: the call's, then the generation configs', then DEFAULTS."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: tuple[int, ...]
    pad: int


def resolve(given: dict[str, Any], configs: list[Any], prompt_length: int) -> Settings:
    """Settings from a call's keywords and generation configs (first wins), as transformers resolves them."""
    def pick(name):
        if given.get(name) is not None:
            return given[name]
        for config in configs:
            value = getattr(config, name, None) if config is not None else None
            if value is not None:
                return value
        return DEFAULTS.get(name)

    new = given.get("max_new_tokens")
    if new is None and given.get("max_length") is not None:
        new = given["max_length"] - prompt_length
    if new is None:
        new = pick("max_new_tokens")
    if new is None:
        new = pick("max_length") - prompt_length
    if not isinstance(new, int) or isinstance(new, bool) or new < 0:
        raise SurgeonError(f"generate: max_new_tokens must be an int >= 0, got {new!r}"
                           + (f" (max_length {pick('max_length')} < the prompt's {prompt_length} tokens)"
                              if given.get("max_new_tokens") is None else ""))
    eos = token_ids(pick("eos_token_id"))
    pad = pick("pad_token_id")
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    do_sample = bool(pick("do_sample"))
    temperature, top_k, top_p = float(pick("temperature")), int(pick("top_k")), float(pick("top_p"))
    if do_sample:
        if not temperature > 0:
            raise SurgeonError(f"generate: temperature must be a strictly positive float when sampling, "
                               f"got {temperature} (for greedy decoding pass do_sample=False)")
        if top_k < 0:
            raise SurgeonError(f"generate: top_k must be an int >= 0 (0: off), got {top_k}")
        if not 0 <= top_p <= 1:
            raise SurgeonError(f"generate: top_p must be in [0, 1], got {top_p}")
    return Settings(new, do_sample, temperature, top_k, top_p, eos, pad)


def token_ids(value: Any) -> tuple[int, ...]:
    """Token ids given as one id, a list or a tensor (None: none)."""
    return tuple(int(e) for e in (value.flatten().tolist() if isinstance(value, torch.Tensor) else
                                  value if isinstance(value, (list, tuple)) else [] if value is None else [value]))


def forced_tokens(given: dict[str, Any], configs: list[Any], settings: Settings) -> dict[int, tuple[int, ...]]:
    """transformers' forced tokens, by the index of the new token they replace: `forced_bos_token_id` the first,
    `forced_eos_token_id` (one id or several) the last; where both fall on one token the EOS wins (it is
    transformers' later processor). Applied to encoder-decoders (BART's generation config sets forced_eos)."""
    forced = {}
    for name, index in (("forced_bos_token_id", 0), ("forced_eos_token_id", settings.max_new_tokens - 1)):
        value = given.get(name)
        ids = token_ids(pick_attr(configs, name, None) if value is None else value)
        if ids:
            forced[index] = ids
    return forced


def process_logits(scores: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_tokens_to_keep: int = 1) -> torch.Tensor:
    """transformers' sampling warpers on (batch, vocab) scores, in its order: temperature (when != 1),
    top-k (when > 0), top-p (when < 1); filtered tokens get -inf."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -min_tokens_to_keep:] = 0
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores


def choose(logits: torch.Tensor, settings: Settings, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row from its logits (batch, vocab): greedy, or sampled as transformers does."""
    scores = logits.to(dtype=torch.float32, copy=True)
    if not settings.do_sample:
        return scores.argmax(dim=-1)
    scores = process_logits(scores, settings.temperature, settings.top_k, settings.top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a forward's output: `.logits`, the first element of a tuple, or the tensor."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# ---------------------------------------------------------------------------------------- the cache

@functools.lru_cache(maxsize=None)
def _layer_class():
    """A transformers cache layer over tensors given to the graph: keys/values (batch, heads, length,
    dim) updated in place at `past + arange(new)`; `past` a 0-d tensor (the tokens already cached)."""
    from transformers.cache_utils import CacheLayerMixin, StaticLayer

    class InputCacheLayer(StaticLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: torch.Tensor):
            CacheLayerMixin.__init__(self)
            self.keys, self.values, self.cumulative_length = keys, values, past
            self.max_cache_len, self.device, self.is_initialized = keys.shape[2], keys.device, True

        def lazy_initialization(self, key_states, value_states):   # given, never allocated here
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            positions = torch.arange(key_states.shape[-2], device=self.keys.device) + self.cumulative_length
            self.keys.index_copy_(2, positions, key_states)
            self.values.index_copy_(2, positions, value_states)
            return self.keys, self.values

        def get_seq_length(self):
            return self.cumulative_length

    return InputCacheLayer


def _cache_forward(self, input_ids, attention_mask, position_ids, past, *kv):
    """The forward the generation graphs are captured from (bound to a shallow copy of the model, so the
    module paths are the model's own): the model's forward over a cache made of the inputs `kv`."""
    from transformers.cache_utils import Cache

    layer = _layer_class()
    cache = Cache(layers=[layer(kv[2 * i], kv[2 * i + 1], past) for i in range(len(kv) // 2)])
    extra = {}
    if self._surgeon_keep_logits:   # the last position's logits only; as an index tensor (an int slices, and
        length = input_ids.shape[1]  # the head's matmul on that view guards batch != 1 under export)
        extra["logits_to_keep"] = torch.arange(length - 1, length, device=input_ids.device)
    out = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self._surgeon_cache_arg: cache}, **extra)
    return logits_of(out)


def _with_cache(model: nn.Module, cache_arg: str, keep_logits: bool) -> nn.Module:
    """A shallow copy of `model` (the same submodules, parameters and config) whose forward takes the cache."""
    wrapper = copy.copy(model)
    wrapper.__dict__["_surgeon_cache_arg"], wrapper.__dict__["_surgeon_keep_logits"] = cache_arg, keep_logits
    wrapper.forward = types.MethodType(_cache_forward, wrapper)
    return wrapper


@dataclass
class _Graph:
    """One generation graph and the context its passes ran in."""

    kind: str                     # prefill | decode
    gm: fx.GraphModule
    ctx: Context
    rows: list = field(default_factory=list)   # its pass rows (the replay runs unverified: checked end to end)


class Generator:
    """`generate` for one compiled module (see the module docstring). `mode` is "cache", "recompute" or
    "unsupported"; `notes` say which and why; `timings` holds the last call's (build, prefill, per token)."""

    def __init__(self, model: nn.Module, ctx: Context, passes: list, mode: str, notes: list[str],
                 cache_arg: str | None = None, keep_logits: bool = False, encoder_decoder: bool = False):
        self.model, self.ctx, self.passes = model, ctx, passes
        self.mode, self.notes = mode, list(notes)
        self.encoder_decoder = encoder_decoder   # returns the decoder's tokens (from its start token), not the prompt
        self.cache_arg, self.keep_logits = cache_arg, keep_logits
        self.graphs: dict[str, _Graph] | None = None
        self.layout: list[tuple[int, int, int]] | None = None      # per layer: kv heads, key dim, value dim
        self.built_for: tuple | None = None                          # (device, dtype) of the tied module
        self.timings: dict[str, float] = {}

    def __deepcopy__(self, memo):
        """A copy of a module copies its generator's graphs and state (tied to the copy's tensors, which the
        same deepcopy makes), but shares the original model: it is only read, and may be large."""
        new = Generator.__new__(Generator)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "model" else copy.deepcopy(value, memo)
        return new

    # ------------------------------------------------------------------ what the compiled module calls

    def generate(self, module: nn.Module, inputs: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Token ids, as transformers' generate returns them (see the module docstring): (batch, prompt + new),
        or for an encoder-decoder the decoder's (batch, 1 + new), from its start token."""
        keywords = KEYWORDS + (ENCODER_DECODER_KEYWORDS if self.encoder_decoder else ())
        unknown = sorted(set(kwargs) - set(keywords))
        if unknown:
            raise SurgeonError(f"generate: unsupported argument{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                               f"(surgeon's generate takes: inputs, {', '.join(keywords)})")
        if self.mode == "unsupported":
            raise SurgeonError("generate: " + " ".join(self.notes))
        ids = kwargs.pop("input_ids", None)
        if inputs is not None and ids is not None:
            raise SurgeonError("generate: pass the prompt once, as `inputs` or `input_ids`")
        ids = inputs if inputs is not None else ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
            raise SurgeonError(f"generate: input_ids must be a 2-D integer tensor (batch, length), got "
                               f"{type(ids).__name__}{list(ids.shape) if isinstance(ids, torch.Tensor) else ''}")
        configs = [kwargs.get("generation_config"), getattr(module, "generation_config", None)]
        start = _decoder_start(module, ids, kwargs, configs) if self.encoder_decoder else None
        out = ids if start is None else start   # what the new tokens follow
        settings = resolve(kwargs, configs, out.shape[1])
        mask = _mask(ids, kwargs.get("attention_mask"), settings)
        forced = forced_tokens(kwargs, configs, settings) if start is not None else None
        use_cache = kwargs.get("use_cache")
        use_cache = use_cache if use_cache is not None else pick_attr(configs, "use_cache", True)
        names = kwargs.get("adapter_names")
        if names is not None:   # one adapter per row (surgeon.serving): checked before anything runs
            from .serving import plan_rows, serving_ctx

            plan_rows(serving_ctx(module).adapters, names, ids.shape[0])
        if settings.max_new_tokens == 0:
            return out
        with torch.no_grad(), evaluating(module):
            if start is not None:
                run = _EncoderDecoderRun(module, ids, mask, start, settings.pad, names)
            else:
                if self.mode == "cache" and use_cache and (lengthening(self.ctx) or recomputing(self.ctx)):
                    use_cache = False   # virtual tokens lengthen the sequence (surgeon.adapters.virtual_tokens);
                    #                     X-LoRA's scaling pass reads the whole sequence (surgeon.adapters.xlora)
                if self.mode == "cache" and use_cache:
                    self._ready(module)   # falls back to recompute (mode) when the graphs cannot serve
                if self.mode == "cache" and use_cache:
                    run = _CacheRun(self, ids, mask, settings.max_new_tokens, module, names)
                else:
                    run = _RecomputeRun(module, ids, mask, names)
            return self._loop(run, out, settings, kwargs.get("generator"), forced)

    def applied(self, module: nn.Module, passes: list) -> None:
        """Run passes just applied to the compiled module on the generation graphs too (when built), re-tie
        and check; a failure drops the graphs, so the next generate rebuilds them or says why it cannot."""
        if self.graphs is None:
            return   # `passes` are in self.passes already (the Compiled's list): the first generate replays them
        try:
            for graph in self.graphs.values():
                graph.rows += run_pipeline(graph.gm, list(passes), graph.ctx, verify=False)
            self._tie(module)
            self._check(module)
        except Exception as error:  # noqa: BLE001 - the next generate rebuilds, and says why if it cannot
            self.graphs = None
            self.notes.append(f"the KV-cache graphs were dropped after {', '.join(p.name for p in passes)} "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                              "the next generate builds them again")

    def invalidate(self) -> None:
        """Drop the generation graphs (the compiled module changed in a way not replayed on them)."""
        self.graphs = None

    # ------------------------------------------------------------------ building the graphs

    def _ready(self, module: nn.Module) -> None:
        """Build the graphs (first call), or re-tie them to the module's current tensors; on failure fall back."""
        if self.graphs is not None and self.built_for != placement(module):
            # the module moved to another dtype or device: build again and move the new graphs while their
            # tensors are their own (tied to the moved module's, they would look moved already)
            self.graphs = None
        if self.graphs is not None:
            self._tie(module)
            return
        start = time.perf_counter()
        try:
            self._build(module)
        except Exception as error:  # noqa: BLE001 - the recompute path still serves, and says why
            reason = " ".join(line.strip() for line in str(error).splitlines()[:3]) or type(error).__name__
            note = (f"generate recomputes the full sequence for each new token: the KV-cache graphs could not be "
                    f"used ({type(error).__name__}: {reason[:300]})")
            self.mode, self.graphs = "recompute", None
            self.notes.append(note)
            warnings.warn(note, stacklevel=4)
            return
        self.timings["build_s"] = time.perf_counter() - start

    def _build(self, module: nn.Module) -> None:
        self.layout = self.layout or _probe(self.model, self.cache_arg)
        graphs = {}
        for kind in ("prefill", "decode"):
            args, shapes = self._example(kind)
            # the prefill's logits at the last position only (the decode graph has one position anyway)
            wrapper = _with_cache(self.model, self.cache_arg, self.keep_logits and kind == "prefill")
            gm = capture(wrapper, args, None, dynamic_shapes=shapes)
            gm.eval()
            spec = self.ctx.spec
            ctx = Context(spec, args, {}, {a.name: AdapterState(a) for a in spec.adapters},
                          torch.Generator().manual_seed(spec.seed))
            graph = _Graph(kind, gm, ctx)
            graph.rows = run_pipeline(gm, list(self.passes), ctx, verify=False)
            graphs[kind] = graph
        self.graphs = graphs
        self._place(module)
        self._tie(module)
        self._check(module)

    def _example(self, kind: str) -> tuple[tuple, tuple]:
        """Example inputs and torch.export dynamic shapes of the prefill (batch x length) or decode (batch x 1)
        graph: batch 2, prompt 3, cache 7 (distinct sizes, none 0 or 1, so none is mistaken for another)."""
        batch, length, total = 2, 3, 7
        device = first_device(self.model)
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        new = length if kind == "prefill" else 1
        ids = torch.zeros(batch, new, dtype=torch.long, device=device)
        mask = torch.ones(batch, total, dtype=torch.long, device=device)
        positions = torch.arange(new, device=device).expand(batch, new) + (0 if kind == "prefill" else length)
        past = torch.tensor(0 if kind == "prefill" else length, device=device)
        kv = [torch.zeros(batch, heads, total, dim, dtype=dtype, device=device)
              for heads, key_dim, value_dim in self.layout for dim in (key_dim, value_dim)]
        b, q, m = (torch.export.Dim("batch", min=1), torch.export.Dim("new", min=1),
                   torch.export.Dim("cache", min=2))
        rows = {0: b, 1: q} if kind == "prefill" else {0: b}
        shapes = (rows, {0: b, 1: m}, rows, None, tuple({0: b, 2: m} for _ in kv))
        return (ids, mask, positions.contiguous(), past, *kv), shapes

    def _tie(self, module: nn.Module) -> None:
        """Make every parameter and buffer of the generation graphs that the module has by name the module's
        own tensor object, and share the adapter state kept outside the graph (parked and merged factors)."""
        own = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
        for graph in self.graphs.values():
            tensors = [*graph.gm.named_parameters(remove_duplicate=False),
                       *graph.gm.named_buffers(remove_duplicate=False)]
            for name, tensor in tensors:
                target = own.get(name)
                if target is None or target is tensor:
                    continue
                owner_path, _, attr = name.rpartition(".")
                owner = graph.gm.get_submodule(owner_path)
                owner._parameters.pop(attr, None)
                owner._buffers.pop(attr, None)
                (owner._parameters if isinstance(target, nn.Parameter) else owner._buffers)[attr] = target
            for name, state in self.ctx.adapters.items():
                mine = graph.ctx.adapters.get(name)
                if mine is None:
                    continue
                sites = {site.path: site for site in state.sites}
                for site in mine.sites:
                    if site.path in sites:
                        site.parked, site.merged = sites[site.path].parked, sites[site.path].merged

    def _place(self, module: nn.Module) -> None:
        """Move the graphs, before they are tied, to the module's device and dtype (what `.to` does to a
        SurgeonModule's graph code: surgeon.portable), and remember it."""
        device, dtype = placement(module)
        for graph in self.graphs.values():
            if placement(graph.gm) != (device, dtype):
                graph.gm.to(device=device, dtype=dtype)
        self.built_for = (device, dtype)

    def _check(self, module: nn.Module) -> None:
        """The cache path against the module's own full forward on the example input ids: a prefill of all but
        the last token then one decode step must give the logits the module gives at the last position, and
        the prefill those at the one before (where the module takes that length)."""
        ids = example_ids(module)
        if ids is None:
            self.notes.append("the KV-cache graphs were not checked against the compiled module (its example has "
                              "no input ids)")
            return
        with torch.no_grad(), evaluating(module), routing.checking():   # the example has no task ids
            expected, got = [logits_of(lm_forward(module, ids))[:, -1]], []
            if ids.shape[1] == 1:
                got.append(_CacheRun(self, ids, torch.ones_like(ids), 1, module).start())
            else:
                run = _CacheRun(self, ids[:, :-1], torch.ones_like(ids[:, :-1]), 1, module)
                first = run.start()
                got.append(run.step(ids[:, -1]))
                try:
                    expected.append(logits_of(lm_forward(module, ids[:, :-1]))[:, -1])
                    got.append(first)
                except InputError:   # the module was compiled for lengths from the example's up
                    pass
        ok, why = compare(expected, got, "close", compute_dtypes(module))
        if not ok:
            raise SurgeonError(f"the KV-cache graphs do not reproduce the compiled module on its example "
                               f"(input ids {list(ids.shape)}): {why}")

    # ------------------------------------------------------------------ the decoding loop

    def _loop(self, run, ids: torch.Tensor, settings: Settings, generator: torch.Generator | None,
              forced: dict[int, tuple[int, ...]] | None = None) -> torch.Tensor:
        """Choose, pad finished rows, advance `run`; `forced`: new token index -> the only tokens allowed there."""
        start = time.perf_counter()
        logits = run.start()
        self.timings["prefill_s"] = time.perf_counter() - start
        eos = torch.tensor(settings.eos, device=ids.device) if settings.eos else None
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        tokens = []
        start = time.perf_counter()
        for index in range(settings.max_new_tokens):
            if forced and index in forced:   # every other token -inf, as transformers' forced-token processors
                logits = torch.full_like(logits, -float("inf")).index_fill_(
                    -1, torch.tensor(forced[index], device=logits.device), 0.0)
            token = choose(logits, settings, generator).to(ids.device)
            if eos is not None:
                token = torch.where(unfinished, token, torch.full_like(token, settings.pad))
                unfinished &= ~torch.isin(token, eos)
            tokens.append(token.to(ids.dtype))
            if index + 1 == settings.max_new_tokens or not bool(unfinished.any()):
                break
            logits = run.step(token)
        steps = len(tokens) - 1
        self.timings["per_token_s"] = (time.perf_counter() - start) / steps if steps else 0.0
        self.timings["tokens"] = len(tokens)
        return torch.cat([ids, torch.stack(tokens, dim=1)], dim=1)


class _CacheRun:
    """One generate call on the cache path: the cache, mask and positions, and the graphs that advance them."""

    def __init__(self, owner: Generator, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, module: nn.Module,
                 adapter_names: list[str] | None = None):
        self.prefill, self.decode = owner.graphs["prefill"].gm, owner.graphs["decode"].gm
        self.extra = ()
        if adapter_names is not None:   # the graphs' mixed-batch copies (surgeon.serving), the rows' plan last
            from .serving import mixed_graph, plan_rows

            self.extra = (plan_rows(owner.graphs["prefill"].ctx.adapters, adapter_names, ids.shape[0]),)
            self.prefill, self.decode = (mixed_graph(owner.graphs[kind].gm, owner.graphs[kind].ctx).forward
                                         for kind in ("prefill", "decode"))
        else:
            self.prefill, self.decode = self.prefill.forward, self.decode.forward
        batch, length = ids.shape
        device, dtype = placement(module)
        self.ids, self.length = ids.to(device), length
        self.mask = torch.zeros(batch, length + new_tokens, dtype=torch.long, device=device)
        self.mask[:, :length] = mask
        self.positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(device)
        self.kv = [torch.zeros(batch, heads, length + new_tokens, dim, dtype=dtype, device=device)
                   for heads, key_dim, value_dim in owner.layout for dim in (key_dim, value_dim)]

    def start(self) -> torch.Tensor:
        past = torch.tensor(0, device=self.mask.device)
        return _logits_out(self.prefill(self.ids, self.mask, self.positions, past, *self.kv, *self.extra))[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.mask[:, self.length] = 1
        self.positions = self.positions[:, -1:] + 1
        past = torch.tensor(self.length, device=self.mask.device)
        logits = self.decode(token.reshape(-1, 1).to(self.mask.device), self.mask, self.positions, past,
                             *self.kv, *self.extra)
        self.length += 1
        return _logits_out(logits)[:, -1]


def _logits_out(out: Any) -> torch.Tensor:
    """A generation graph's logits (a mixed-batch copy returns its flat outputs: the one tensor in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _RecomputeRun:
    """One generate call on the recompute path: the module runs on each row's whole sequence so far; rows
    with padding run without it, those of one length together (a model without a mask input could not
    tell pads from tokens, and one with a mask but no positions input would place them wrong)."""

    def __init__(self, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                 adapter_names: list[str] | None = None):
        self.module, self.batch, self.names = module, ids.shape[0], adapter_names
        ids, mask = ids.to(first_device(module)), mask.to(first_device(module))
        if bool(mask.all()):
            self.groups = [(torch.arange(self.batch, device=ids.device), ids)]
        else:
            lengths = mask.sum(dim=1)
            self.groups = []
            for length in sorted(set(lengths.tolist())):
                rows = (lengths == length).nonzero().flatten()
                self.groups.append((rows, torch.stack([ids[r][mask[r].bool()] for r in rows.tolist()])))

    def _last(self, seq: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
        extra = {} if names is None else {"adapter_names": names}
        try:
            return logits_of(lm_forward(self.module, seq, **extra))[:, -1]
        except InputError:
            if seq.shape[0] != 1:
                raise
            # a module compiled for batches from 2 up (verify=False keeps export's range): the row twice
            extra = {} if names is None else {"adapter_names": names * 2}
            with routing.rows(torch.zeros(2, dtype=torch.long)):   # the row's task id twice, where given
                return logits_of(lm_forward(self.module, seq.repeat(2, 1), **extra))[:1, -1]

    def _logits(self) -> torch.Tensor:
        out = None
        for rows, seq in self.groups:
            with routing.rows(rows):   # the rows' task ids, where the call gave them (surgeon.routing)
                logits = self._last(seq, None if self.names is None else [self.names[r] for r in rows.tolist()])
            if out is None:
                out = logits.new_empty((self.batch, logits.shape[-1]))
            out[rows] = logits
        return out

    def start(self) -> torch.Tensor:
        return self._logits()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.groups = [(rows, torch.cat([seq, token[rows].reshape(-1, 1).to(seq)], dim=1))
                       for rows, seq in self.groups]
        return self._logits()


class _EncoderDecoderRun:
    """One generate call of an encoder-decoder (recompute): each step runs the compiled module on the prompt,
    its attention mask and the decoder's tokens so far, and takes the logits at the decoder's last position.
    Sizes below the least the graph takes (a compile with verify=False keeps torch.export's range, from 2) are
    padded up: the batch with copies of the first row, the prompt with pad tokens its mask hides, the decoder
    with pad tokens after its last one (its self-attention is causal: that position does not see them)."""

    def __init__(self, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, pad: int,
                 adapter_names: list[str] | None = None):
        inputs = getattr(module, "meta", {}).get("surgeon_inputs")
        names = getattr(inputs, "names", ())
        device = first_device(module)
        self.module, self.pad, self.batch = module, pad, ids.shape[0]
        self.rows = _least(inputs, ("input_ids", 0), ("attention_mask", 0), ("decoder_input_ids", 0))
        self.length = _least(inputs, ("decoder_input_ids", 1))
        self.decoder = start.to(device)
        # rows padded up with copies of the first take the first row's adapter
        self.extra = {} if adapter_names is None else \
            {"adapter_names": list(adapter_names) + [adapter_names[0]] * max(0, self.rows - self.batch)}
        self.decoder_mask = "decoder_attention_mask" in names and "decoder_attention_mask" not in inputs.fills
        ids, mask = ids.to(device), mask.to(device)
        if "attention_mask" in names:
            width = _least(inputs, ("input_ids", 1), ("attention_mask", 1))
            self.encoder = {"input_ids": _pad_to(ids, self.rows, width, pad),
                            "attention_mask": _pad_to(mask, self.rows, width, 0)}
        elif bool(mask.all()):
            self.encoder = {"input_ids": _pad_to(ids, self.rows, 0, pad)}
        else:
            raise SurgeonError(f"generate: the prompts are padded, but {getattr(inputs, 'model', 'the model')} was "
                               "compiled without an attention_mask input to hide the padding: compile it with "
                               "example_kwargs={'attention_mask': <the example's mask>, 'decoder_input_ids': ...}")

    def _logits(self) -> torch.Tensor:
        decoder = _pad_to(self.decoder, self.rows, self.length, self.pad)
        extra = {"decoder_attention_mask": torch.ones_like(decoder)} if self.decoder_mask else {}
        padded = torch.cat([torch.arange(self.batch), torch.zeros(max(0, self.rows - self.batch), dtype=torch.long)])
        with routing.rows(padded):   # rows padded up with copies of the first take its task id too, where given
            out = self.module(**self.encoder, decoder_input_ids=decoder, **extra, **self.extra)
        return logits_of(out)[:self.batch, self.decoder.shape[1] - 1]

    def start(self) -> torch.Tensor:
        return self._logits()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.decoder = torch.cat([self.decoder, token.reshape(-1, 1).to(self.decoder)], dim=1)
        return self._logits()


# ---------------------------------------------------------------------------------------- attaching

def generator_for(model: nn.Module, gm: fx.GraphModule, ctx: Context, passes: list) -> Generator | None:
    """The generator a compiled module gets: cache for a causal LM whose forward takes an attention cache,
    recompute for one that does not (or any module mapping integer ids (batch, length) to 3-D float
    logits) and for an encoder-decoder captured with a dynamic-length decoder_input_ids input,
    "unsupported" (saying how to compile it) for one captured otherwise; None for a model that does not
    generate."""
    name = type(model).__name__
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if callable(can_generate):   # a transformers model
        try:
            generates = bool(can_generate())
        except Exception:  # noqa: BLE001 - a model that cannot answer does not generate
            generates = False
        if not generates:
            return None
        if getattr(config, "is_encoder_decoder", False):
            problem = _decoder_input_problem(name, gm)
            if problem:
                return Generator(model, ctx, passes, "unsupported", [problem])
            return Generator(model, ctx, passes, "recompute", [
                f"generate recomputes the encoder and the whole decoder sequence for each new token with the "
                f"compiled module: {name} is an encoder-decoder model (a decoder graph over a cache of the "
                "encoder's output is not built yet)"], encoder_decoder=True)
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        cache_arg = next((a for a in ("cache", "past_key_values") if a in parameters), None)
        if cache_arg is not None and _transformers_cache_available():
            return Generator(model, ctx, passes, "cache",
                             [f"generate runs a prefill graph and a one-token decode graph over a preallocated KV "
                              f"cache, captured from {name} on the first call"],
                             cache_arg=cache_arg, keep_logits="logits_to_keep" in parameters)
        return Generator(model, ctx, passes, "recompute", [_recompute_note(name)])
    if _lm_shaped(gm):
        return Generator(model, ctx, passes, "recompute", [_recompute_note(name)])
    return None


def _recompute_note(name: str) -> str:
    return (f"generate recomputes the full sequence for each new token with the compiled module: {name}'s "
            "forward takes no attention cache")


def _decoder_input_problem(name: str, gm: fx.GraphModule | None) -> str | None:
    """Why an encoder-decoder's compiled module cannot be fed the decoder's tokens (None: it can)."""
    inputs = gm.meta.get("surgeon_inputs") if gm is not None else None
    how = ("compile it with example_kwargs={'decoder_input_ids': <(batch, length) token ids>} (and "
           "'attention_mask' for padded prompts) and dynamic shapes (the default)")
    if inputs is None or "decoder_input_ids" not in inputs.names:
        return (f"{name} is an encoder-decoder model compiled without a decoder_input_ids input, so generate "
                f"cannot feed it the tokens it makes: to generate, {how}")
    dims = inputs.shapes.get("decoder_input_ids", ())
    if len(dims) == 2 and dims[1].size is not None:
        return (f"{name} is an encoder-decoder model whose decoder_input_ids length was captured static at "
                f"{dims[1].size}, so generate cannot grow the decoder's sequence: to generate, {how}, without "
                "static_shapes: true / dynamic=False")
    return None


def _transformers_cache_available() -> bool:
    try:
        from transformers.cache_utils import Cache, StaticLayer  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _lm_shaped(gm: fx.GraphModule) -> bool:
    """Whether the graph's first input is integer (batch, length) and its first output float 3-D."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = next(iter(gm.graph.find_nodes(op="output")), None)
    if not placeholders or output is None:
        return False
    first = placeholders[0].meta.get("val")
    leaves = [n for n in pytree.tree_leaves(output.args[0]) if isinstance(n, fx.Node)]
    result = leaves[0].meta.get("val") if leaves else None
    return (isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point()
            and not first.is_complex() and isinstance(result, torch.Tensor) and result.dim() == 3
            and result.is_floating_point())


# ---------------------------------------------------------------------------------------- helpers

def _probe(model: nn.Module, cache_arg: str) -> list[tuple[int, int, int]]:
    """Per layer (kv heads, key dim, value dim), read from the cache the model itself fills on 2 tokens."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=first_device(model))
    with evaluating(model), torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise SurgeonError(f"{type(model).__name__} returned no cache layers to size a KV cache from")
    layout = []
    for index, layer in enumerate(layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4
                and values.dim() == 4 and keys.shape[2] == 2):
            raise SurgeonError(f"cache layer {index} ({type(layer).__name__}) is not a key/value attention cache "
                               "(batch, heads, length, dim)")
        layout.append((keys.shape[1], keys.shape[3], values.shape[3]))
    return layout


def lm_forward(module: nn.Module, ids: torch.Tensor, **extra: Any) -> Any:
    """The compiled module on unpadded token ids, with an all-ones attention mask where the graph takes one
    (an `attention_mask` given in the example is a required input, not an optional one); `extra`: the
    call's `adapter_names`, if any."""
    names = getattr(getattr(module, "meta", {}).get("surgeon_inputs"), "names", ())
    if "attention_mask" in names:
        return module(ids, attention_mask=torch.ones_like(ids), **extra)
    return module(ids, **extra)


def _mask(ids: torch.Tensor, mask: torch.Tensor | None, settings: Settings) -> torch.Tensor:
    """The call's attention mask, checked; without one, as transformers infers it (pad tokens are padding
    when the pad token is not also an EOS token)."""
    if mask is None:
        if settings.pad not in settings.eos and bool((ids == settings.pad).any()):
            return (ids != settings.pad).long()
        return torch.ones_like(ids, dtype=torch.long)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise SurgeonError(f"generate: attention_mask must have the shape of input_ids {list(ids.shape)}, got "
                           f"{list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.long().to(ids.device)
    if bool((mask.sum(dim=1) == 0).any()):
        raise SurgeonError("generate: a prompt row has no tokens (its attention_mask is all zeros)")
    return mask


def _decoder_start(module: nn.Module, ids: torch.Tensor, given: dict, configs: list) -> torch.Tensor:
    """An encoder-decoder's first decoder tokens (batch, 1): the call's decoder_start_token_id, else the generation
    configs', else their bos_token_id (as transformers picks it); one id, or one per row."""
    start = given.get("decoder_start_token_id")
    for name in ("decoder_start_token_id", "bos_token_id"):
        start = pick_attr(configs, name, None) if start is None else start
    if start is None:
        raise SurgeonError(f"generate: {type(module).__name__} has no decoder_start_token_id (nor bos_token_id) in "
                           "its generation config: pass decoder_start_token_id=")
    start = torch.as_tensor(start, dtype=ids.dtype, device=ids.device)
    if start.dim() > 1 or (start.dim() == 1 and start.numel() != ids.shape[0]):
        raise SurgeonError(f"generate: decoder_start_token_id must be one id or one per prompt row "
                           f"({ids.shape[0]}), got shape {list(start.shape)}")
    return start.reshape(-1, 1).expand(ids.shape[0], 1).clone()


def _least(inputs: Any, *axes: tuple[str, int]) -> int:
    """The least size the graph takes on all of these (input name, axis): a static size, or a range's low end."""
    least = 0
    for name, axis in axes:
        dims = getattr(inputs, "shapes", {}).get(name, ())
        if axis < len(dims):
            least = max(least, dims[axis].size if dims[axis].size is not None else dims[axis].low)
    return least


def _pad_to(x: torch.Tensor, rows: int, length: int, value: int) -> torch.Tensor:
    """`x` (batch, length) padded on the right with `value` to `length`, then with copies of its first row to
    `rows` (each only where it is shorter)."""
    if x.shape[1] < length:
        x = torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), value)], dim=1)
    if x.shape[0] < rows:
        x = torch.cat([x, x[:1].expand(rows - x.shape[0], -1)], dim=0)
    return x


def pick_attr(configs: list, name: str, default: Any) -> Any:
    for config in configs:
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return default


def example_ids(module: nn.Module) -> torch.Tensor | None:
    """The compiled module's example input ids (its first integer 2-D example input)."""
    example = getattr(module, "meta", {}).get("surgeon_example")
    for leaf in pytree.tree_leaves(example):
        if isinstance(leaf, torch.Tensor) and leaf.dim() == 2 and not leaf.is_floating_point():
            return leaf
    return None
