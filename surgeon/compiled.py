"""surgeon.compile and the Compiled result: a normal nn.Module, a report, save and adapter I/O."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import yaml
from torch import nn

from .adapter_io import save_adapter_dir, save_peft_dir
from .capture import split_kwargs
from .errors import SpecError, SurgeonError
from .graph import compute_nodes, count_parameters, get_tensor, meta_tensors
from .pipeline import AdapterState, Context, PassRow, run_pipeline
from .fastpath import recompile
from .generate import Generator, generator_for
from .inputs import install_fills
from .verify import capture_verified, optional_inputs
from .passes import passes
from .report import Report
from .serving import Serving
from .safe_io import check_out_dir, real_dir, write_text_nofollow
from . import spec as spec_module
from .spec import Spec, _pass, spec_to_dict


def load_spec(spec: "str | Path | dict | Spec") -> Spec:
    """Parse and validate a spec (a YAML/TOML file path, YAML text or a dict), its pipeline against
    surgeon's passes; raise SpecError naming the key (and line) of the first problem."""
    return spec_module.load_spec(spec, passes())


def compile(model: nn.Module, example_inputs: Any, spec: "str | Path | dict | Spec",
            example_kwargs: dict | None = None, *, dynamic: bool | None = None, dynamic_shapes: Any = None,
            verify: bool | None = None, progress: Callable[[str], None] | None = None) -> "Compiled":
    """Capture `model`, run the spec's pipeline with verification, and return a Compiled.

    The module takes any batch and length the model accepts (every input dimension is dynamic where
    the model lets it vary); `dynamic=False` or the spec's `static_shapes: true` captures the example's
    shapes only, and `dynamic_shapes=` (torch.export's structure) takes full control. Verification runs
    on the example and on a second shape derived from it (surgeon.verify).

    Structure only: a model whose weights are on the meta device (built under `torch.device("meta")`),
    with meta example inputs, is captured and rewritten without reading any weight data: verification
    is skipped (the report's check column says "skipped (meta weights)"), passes that need the weights'
    values (merge, fold-bn ...) are refused with a PassError, `Compiled.merge_plan()` lists what a
    merge would change, and inserted adapters' parameters are real tensors on the CPU (surgeon.passes.insert).
    """
    spec = load_spec(spec)
    validate_against_model(spec, model)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    verify = spec.verify if verify is None else verify
    dynamic = (not spec.static_shapes) if dynamic is None else dynamic
    structure_only = bool(meta_tensors(model))
    start = time.perf_counter()
    if progress:
        progress(f"capturing {type(model).__name__}")
    if structure_only:   # no values: nothing to check against, and optional inputs are decided by comparing outputs
        verify, fills = False, {}
    else:
        example_kwargs, fills = optional_inputs(model, args, example_kwargs) if dynamic_shapes is None else \
            (example_kwargs, {})
    gm, check, more, notes = capture_verified(model, args, example_kwargs, dynamic_shapes, dynamic, verify)
    if structure_only:
        check, notes = "skipped (meta weights)", [STRUCTURE_ONLY_NOTE, *notes]
    if fills:
        gm.meta["surgeon_inputs"].fills.update(fills)
        install_fills(gm, fills)
        recompile(gm)
    notes += [f"captured {name} as an optional input (a call without it gets {fill.kind} like {fill.like})"
              for name, fill in fills.items()]
    tensor_kwargs, _ = split_kwargs(example_kwargs)
    ctx = Context(spec, args, tensor_kwargs, {a.name: AdapterState(a) for a in spec.adapters},
                  torch.Generator().manual_seed(spec.seed), more_examples=more)
    params, trainable = count_parameters(gm)
    rows = [PassRow("capture", compute_nodes(gm), [], (params, params), trainable, (0, compute_nodes(gm)),
                    time.perf_counter() - start, check, notes)]
    compiled = Compiled(gm, ctx, Report(type(model).__name__, gm.meta["surgeon_frontend"], rows, ctx.adapters))
    compiled.nodes_before = node_table(gm)
    gm.meta["surgeon_serving"] = Serving(ctx)   # for calls with adapter_names (surgeon.serving)
    compiled.original = model
    generator = generator_for(model, gm, ctx, compiled.applied)
    if generator is not None and structure_only:   # a meta model generates nothing: say so when asked
        generator = Generator(model, ctx, compiled.applied, "unsupported", [STRUCTURE_ONLY_GENERATE])
    if generator is not None:
        gm.meta["surgeon_generator"] = generator
        if generator.mode != "cache":
            notes += generator.notes   # the capture row's: how this model generates
    compiled.apply([p for p in spec.pipeline], verify=verify, progress=progress)
    return compiled


STRUCTURE_ONLY_NOTE = (
    "structure only: the model's weights are on the meta device, so no weight data is read; verification is "
    "skipped (it runs the graph), passes that need the weights' values are refused, and optional tokenizer "
    "inputs (attention_mask, token_type_ids) are not probed: pass them in example_kwargs to capture them")
STRUCTURE_ONLY_GENERATE = ("a structure-only compile (meta weights) cannot generate: compile the model with its "
                           "weights loaded")


def validate_against_model(spec: Spec, model: nn.Module) -> None:
    """Check targets and ranks against the model's modules before anything is captured."""
    modules = dict(model.named_modules())
    for i, adapter in enumerate(spec.adapters):
        key = ("adapters", i, "from_peft" if adapter.from_peft else "from_dir") if adapter.loaded else None
        for j, glob in enumerate(adapter.targets):
            from .adapter_ops import WEIGHT_SITE_OPS
            from .rules import path_matches

            hits = [p for p in modules if p and path_matches(p, glob)]
            by_name = any(op in WEIGHT_SITE_OPS for op in adapter.kind.site_ops)
            if not hits and not any(path_matches(p, glob) for p, t in model.named_parameters(remove_duplicate=False)
                                    if t.dim() == 3 or by_name):
                # a 3-D parameter (fused MoE experts) is a site by its own name (adapter_ops.PARAM_SITE), and so
                # is a norm's or an embedding's parameter (adapter_ops.WEIGHT_SITE_OPS: ln_tuning's saved targets)
                raise spec.error(key or ("adapters", i, "targets", j),
                                 f"target '{glob}' matches no module of {type(model).__name__} "
                                 f"(module paths look like: {', '.join(list(p for p in modules if p)[:4])} ...)")
            for path in hits:
                dims = _weight_dims(modules[path])
                options = {**adapter.options, **(adapter.loaded.site_options.get(path, {}) if adapter.loaded else {})}
                site_rank = options.get("rank")
                limit = adapter.kind.rank_limit(options, *dims) if dims and site_rank is not None else None
                if limit is not None and site_rank > limit[0]:
                    raise spec.error(key or ("adapters", i, "rank"),
                                     f"rank {site_rank} exceeds what a {adapter.type} adapter takes on '{path}' "
                                     f"({dims[0]} in, {dims[1]} out): at most {limit[1]} = {limit[0]}")


def _weight_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a module with a 2-D weight (GPT-2's Conv1D stores it in x out)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or isinstance(module, nn.Embedding):
        return None
    rows, cols = weight.shape
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)


class Compiled:
    """The result of surgeon.compile: `.module` (an nn.Module), `.report`, adapters, save, `generate`.

    `.original` is the model compile captured: a language model's generator captures its KV-cache graphs
    from it on the first `generate` (surgeon.generate). It costs little memory while its parameters share
    storage with `.module`'s; a pass that makes new weights (merge, a kind that rewrites the base weight)
    leaves the original's in memory too, and its buffers are its own. `.applied` lists the pass instances
    run on `.module`, in order, which the generator replays."""

    def __init__(self, module: fx.GraphModule, ctx: Context, report: Report):
        self.module, self.ctx, self.report = module, ctx, report
        self.nodes_before: list[dict] | None = None   # node table right after capture (for diffs)
        # every pass instance run on .module, in order (the spec's pipeline, then apply / set_active): the
        # generator replays them on its graphs (surgeon.generate)
        self.applied: list = []
        # the model compile captured (its generator captures the KV-cache graphs from it on the first generate;
        # parameters share storage with .module's until a pass replaces them, e.g. merged weights)
        self.original: nn.Module | None = None

    @property
    def adapters(self) -> dict[str, AdapterState]:
        return self.ctx.adapters

    @property
    def kernels(self) -> dict[str, str]:
        """Generated kernel source of each lowered region (empty before `lower`)."""
        return dict(self.module.meta.get("surgeon_kernels", {}))

    def apply(self, pipeline: list, verify: bool = True, progress: Callable[[str], None] | None = None) -> "Compiled":
        """Run more passes (names or {name: options}, as in a spec) on this compiled module."""
        table = passes()
        specs = [p if hasattr(p, "options") else _pass(self.ctx.spec, i, p, set(self.ctx.adapters), table)
                 for i, p in enumerate(pipeline)]
        instances = [table[p.name](**p.options) for p in specs]
        generator, ran = self.generator, len(self.ctx.history)
        try:
            self.report.rows += run_pipeline(self.module, instances, self.ctx, verify=verify, progress=progress)
        except BaseException:
            self.applied += instances[:len(self.ctx.history) - ran]   # those that ran changed .module
            if generator is not None:
                generator.invalidate()   # rebuilt (all passes replayed) by the next generate
            raise
        self.applied += instances
        if generator is not None:
            generator.applied(self.module, instances)   # the generation graphs get them too (once built)
        return self

    @property
    def structure_only(self) -> bool:
        """Whether `.module` has tensors on the meta device (a structure-only compile: surgeon.compile)."""
        return bool(meta_tensors(self.module))

    def merge_plan(self, adapters: list[str] | None = None) -> list[dict]:
        """What `apply(["merge"])` would change, per site, without computing it (surgeon.passes.merge.plan):
        on a structure-only compile, where merge itself is refused, this is what it can say."""
        from .passes.merge import plan

        return plan(self.module, self.ctx, tuple(adapters) if adapters else None)

    @property
    def generator(self):
        """The module's surgeon.generate.Generator (None for a model that does not generate)."""
        return self.module.meta.get("surgeon_generator")

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """Token ids, as transformers' generate returns them: `.module.generate` (see surgeon.generate)."""
        return self.module.generate(*args, **kwargs)

    def adapter_weights(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """An adapter's current parameters: module path -> param name -> tensor."""
        state = self._state(name)
        return {s.path: (s.merged or s.parked or {p: get_tensor(self.module, t).detach() for p, t in s.params.items()})
                for s in state.sites}

    def load_adapter(self, path: str | Path, name: str, active: bool = False) -> "Compiled":
        """Add the adapter saved in `path` (surgeon's or PEFT's folder) as `name`, without recapture; parked
        unless `active` (rows pick it with adapter_names). surgeon.serving.load_adapter says what is refused."""
        from .serving import load_adapter

        load_adapter(self, path, name, active, validate_against_model)
        return self

    def unload_adapter(self, name: str) -> "Compiled":
        """Take an inserted or inactive adapter out (surgeon.serving.unload_adapter), without recapture."""
        from .serving import unload_adapter

        unload_adapter(self, name)
        return self

    def adapter_bytes(self) -> dict[str, int]:
        """Bytes of parameters each adapter holds now (the bank's memory; surgeon.serving.adapter_bytes)."""
        from .serving import adapter_bytes

        return adapter_bytes(self)

    def set_active(self, *names: str) -> "Compiled":
        """Run only the named inserted adapters (others are parked with their weights), no recapture."""
        return self.apply([{"activate": {"adapters": list(names)}}], verify=False)

    def save_adapter(self, name: str, directory: str | Path, format: str = "surgeon") -> None:
        """Write one adapter as surgeon's safetensors + JSON folder, or (format='peft') PEFT's.

        Under FSDP2 (`fully_shard`) each process holds shards: call `.module.unshard()` on every process first
        (and `.module.reshard()` after); sharded parameters are refused before anything is written."""
        state = self._state(name)
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)   # never imported: none
        sharded = [f"{path}.{p}" for path, ps in self.adapter_weights(name).items() for p, t in ps.items()
                   if dtensor is not None and isinstance(t, dtensor)]
        if sharded:
            raise SurgeonError(f"save_adapter: adapter '{name}' has parameters sharded by FSDP (fully_shard), e.g. "
                               f"{sharded[0]}: call compiled.module.unshard() on every process, save_adapter on one, "
                               "then compiled.module.reshard() (docs/distributed.md)")
        if state.status == "quantized":
            if format == "peft":
                raise SpecError(f"adapters.{name}", "a quantized adapter has no PEFT format; save it as surgeon's")
            from .quantized_io import save_quantized_adapter

            return save_quantized_adapter(self, name, directory)
        weights = self.adapter_weights(name)
        site_options = {s.path: {k: v for k, v in s.options.items() if v != state.spec.options.get(k)}
                        for s in state.sites}
        if format == "peft":
            weights = self._peft_conv_shapes(state, weights)
            save_peft_dir(Path(directory), state.spec.options, weights,
                          {s.path for s in state.sites if s.op == "addmm"}, kind=state.spec.type,
                          site_options={p: o for p, o in site_options.items() if o})
        else:
            save_adapter_dir(Path(directory), name, state.spec.type, state.spec.options, weights,
                             {p: o for p, o in site_options.items() if o})

    def _peft_conv_shapes(self, state: AdapterState, weights: dict) -> dict:
        """LoRA factors of conv sites in PEFT's conv layout: A (r, in, *kernel) and B (out, r / groups,
        1, ...); surgeon keeps them as the 2-D maps (r, in * prod(kernel)) and (out, r / groups)."""
        out = dict(weights)
        for site in state.sites:
            params = weights[site.path]
            if not site.op.startswith("conv") or not {"lora_A", "lora_B"} <= set(params):
                continue
            kernel = tuple(get_tensor(self.module, site.weight).shape[2:])
            A, B = params["lora_A"], params["lora_B"]
            out[site.path] = {**params, "lora_A": A.reshape(A.shape[0], -1, *kernel),
                              "lora_B": B.reshape(*B.shape, *(1,) * len(kernel))}
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the report, spec, readable graph, node tables, graph views (graph.html, graph.dot),
        kernels and every adapter under `directory`.

        `directory` may be a symlink to a folder, but nothing is written through a symlink inside
        it: a link at one of the names written here (graph.py, kernels/, adapters/ ...) is replaced
        by a plain file or folder, and its target is left untouched. `directory` naming a file is a
        SurgeonError."""
        out = check_out_dir(directory, "save: directory")
        out.mkdir(parents=True, exist_ok=True)
        write_text_nofollow(out / "report.txt", str(self.report) + "\n")
        write_text_nofollow(out / "report.json", json.dumps(self.report.to_dict(), indent=2, default=str))
        write_text_nofollow(out / "spec.yaml", yaml.safe_dump(spec_to_dict(self.ctx.spec), sort_keys=False))
        write_text_nofollow(out / "graph.py", self.module.code)
        after = node_table(self.module)
        write_text_nofollow(out / "nodes.json", json.dumps(after, indent=1))
        if self.nodes_before is not None:
            from .visualize import write_views

            write_text_nofollow(out / "nodes_before.json", json.dumps(self.nodes_before, indent=1))
            write_views(out, self.nodes_before, after, self.report.to_dict())
        from .groups import analyze_groups

        groups = self.module.meta.get("surgeon_groups") or analyze_groups(
            self.module, (self.ctx.example_args, self.ctx.example_kwargs), store=False)
        write_text_nofollow(out / "groups.json", json.dumps(groups, indent=1))
        for region, source in self.kernels.items():
            kernels = real_dir(out / "kernels")
            write_text_nofollow(kernels / f"{region.replace('/', '_').replace('.', '_')}.py", source)
        for name, state in self.adapters.items():
            if state.status in ("inserted", "inactive", "lowered", "merged", "quantized"):
                self.save_adapter(name, real_dir(real_dir(out / "adapters") / name))
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model with its running adapters merged, under the original names, as a checkpoint its
        own class loads (`from_pretrained` for a Hugging Face model; surgeon.pretrained)."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory)

    def _state(self, name: str) -> AdapterState:
        if name not in self.adapters:
            raise SpecError("adapters", f"no adapter named '{name}'; known: {sorted(self.adapters)}")
        return self.adapters[name]


def node_table(gm: fx.GraphModule) -> list[dict]:
    """One record per node: name, op, target, module path, creating pass, shape and dtype."""
    rows = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        rows.append({"name": node.name, "op": node.op, "target": str(node.target),
                     "path": node.meta.get("surgeon_path", ""), "pass": node.meta.get("surgeon_pass", ""),
                     "adapter": node.meta.get("surgeon_adapter"),
                     "shape": [d if isinstance(d, int) else str(d) for d in val.shape]   # a symbol: its name
                     if isinstance(val, torch.Tensor) else None,
                     "dtype": str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None,
                     "inputs": [a.name for a in node.all_input_nodes]})
    return rows
