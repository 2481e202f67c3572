"""Check a merged checkpoint against its base checkpoint and adapters, one block at a time.

    result = verify_layerwise("llama-7b/", "llama-7b-merged/", "adapter/")      # or several adapter folders
    print(result)   # layer by layer, 32 blocks (+3 other modules), max rel err 2.1e-06

The model is built from the base folder's config.json with its parameters on the meta device and its
buffers computed for real (surgeon.config_model), then run once on example input ids with a hook on each
of its blocks (the children of every outermost nn.ModuleList of two or more modules of one class that hold
parameters: a transformer's layers) and on each module outside them that holds parameters (embeddings,
final norm, lm_head). When such a module is called:

1. its inputs are recorded (positional and keyword: hidden states, attention mask, rotary cos/sin, as the
   model's own forward computes them; every block's input is the previous block's *reference* output);
2. its weights are read from the base checkpoint, tensor by tensor, and it runs with every adapter applied
   unmerged: each adapted module (nn.Linear, or GPT-2's Conv1D) runs the kind's own forward (the code the
   insert pass puts in a graph, run eagerly) around its base op, the adapters of a module nested in the
   order they were merged (the first innermost);
3. those weights are dropped (back to the meta device), the same module is read from the merged checkpoint
   and run on the recorded inputs, without adapters; its tensors that no adapter touches must be the base
   checkpoint's bit for bit (their SHA-256 digests, taken as each is read);
4. the outputs are compared as surgeon.pipeline.compare compares a pass's (the dtype's TOLERANCE; exact
   for a module no adapter touches), the merged weights are dropped, and the model's forward goes on with
   the reference output.

Memory: the tensors of one module from one checkpoint at a time (a block, or the embedding where that is
larger), the adapters, and the activations of the example; never the model. Every checkpoint tensor
that the example's forward does not reach is compared bit for bit with the base checkpoint's (an adapted
one it does not reach fails the check: nothing computed it).

Refused, naming the model class: a model with no repeated blocks; a forward that reads a weight outside
the modules it calls (the weight would be a meta tensor); an adapted module that is not an nn.Linear or a
Conv1D; a second adapter on a module whose kind reads or rewrites the base weight (it would need the first
adapter's merged weight). A mismatch raises LayerwiseError naming the module (block i of n), the rule and the error.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from safetensors import safe_open

from .adapters import EagerBranch, merged_weight
from .config_model import build_meta_model, config_path, first_line
from .errors import SurgeonError
from .pipeline import compare

_HOW = "verify_layerwise"
DEFAULT_EXAMPLE = (2, 16)   # batch x length of the example input ids (length capped by the model's positions)


class LayerwiseError(SurgeonError):
    """The merged checkpoint does not compute what base + adapters compute (or the inputs are wrong)."""


class LayerwiseUnsupported(LayerwiseError):
    """The model or its adapters cannot be checked layer by layer; nothing says the merged checkpoint is wrong."""


@dataclass
class ModuleCheck:
    """One module's check: where, its class, how (close or exact), the error and what it read."""

    path: str
    cls: str
    mode: str
    rel_err: float
    check: str
    bytes: int            # the module's tensors read from one checkpoint
    seconds: float


@dataclass
class LayerwiseResult:
    """What verify_layerwise checked: every block and other module run, the tensors compared bit for bit."""

    model: str
    example: tuple[int, ...]
    blocks: list[ModuleCheck] = field(default_factory=list)
    others: list[ModuleCheck] = field(default_factory=list)   # embeddings, final norm, lm_head: outside the blocks
    unreached: int = 0                   # checkpoint tensors the forward did not read, compared bit for bit
    peak_bytes: int = 0                  # the most checkpoint data held at once
    largest_module_bytes: int = 0        # the largest module's tensors from one checkpoint
    seconds: float = 0.0
    reference: torch.Tensor | None = None   # the model's first output (logits) with the adapters unmerged

    mode = "layer by layer"

    @property
    def max_rel_err(self) -> float:
        return max((c.rel_err for c in (*self.blocks, *self.others)), default=0.0)

    def __str__(self) -> str:
        others = f" (+{len(self.others)} other modules)" if self.others else ""
        return f"{self.mode}, {len(self.blocks)} blocks{others}, max rel err {self.max_rel_err:.1e}"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "model": self.model, "example": list(self.example),
                "max_rel_err": self.max_rel_err, "unreached_tensors_bitwise": self.unreached,
                "peak_bytes": self.peak_bytes, "largest_module_bytes": self.largest_module_bytes,
                "seconds": self.seconds,
                "modules": [{"path": c.path, "class": c.cls, "block": c in self.blocks, "mode": c.mode,
                             "rel_err": c.rel_err, "check": c.check} for c in (*self.blocks, *self.others)]}


def verify_layerwise(base_dir: "str | Path", merged_dir: "str | Path", adapters: Any, example: Any = None, *,
                     dtype: "torch.dtype | str | None" = None,
                     progress: Callable[[str], None] | None = None) -> LayerwiseResult:
    """Check that `merged_dir`'s checkpoint computes what `base_dir`'s does with `adapters` unmerged.

    `adapters`: an adapter folder (surgeon's, quantized, or PEFT's, as merge_checkpoint reads them), a list
    of them merged in that order, or a Compiled (its inserted adapters, in its order). `example`: the input
    ids: None (seeded random ids of shape DEFAULT_EXAMPLE), a shape `(batch, length)`, or a tensor of ids.
    `dtype`: the model's dtype (default: the config's), as compile_pretrained builds it.

    Raises LayerwiseError naming the first module whose merged output differs; returns a LayerwiseResult.
    Both folders are only read."""
    base_dir, merged_dir = Path(base_dir), Path(merged_dir)
    config_path(base_dir, _HOW)
    with _adapter_folders(adapters) as folders:
        loaded = [_read_adapter(folder) for folder in folders]
        base, merged = _Checkpoint(base_dir, "base"), _Checkpoint(merged_dir, "merged")
        model = build_meta_model(base_dir, dtype, real_buffers=True, how=_HOW)
        return _Run(model, base, merged, loaded, progress).run(_example_ids(model, example))


# ---------------------------------------------------------------- inputs

@contextlib.contextmanager
def _adapter_folders(adapters: Any) -> Iterator[list[tuple[str, Path]]]:
    """(name, folder) per adapter, in merge order; a Compiled's running adapters saved to a temporary folder."""
    if hasattr(adapters, "save_adapter") and hasattr(adapters, "adapters"):
        running = [n for n, s in adapters.adapters.items() if s.status in ("inserted", "quantized")]
        if not running:
            raise LayerwiseError(f"{_HOW}: the Compiled has no inserted adapter to check against")
        with tempfile.TemporaryDirectory(prefix="surgeon-layerwise-") as tmp:
            for name in running:
                adapters.save_adapter(name, Path(tmp) / name)
            yield [(name, Path(tmp) / name) for name in running]
        return
    items = [adapters] if isinstance(adapters, (str, Path)) else list(adapters) if isinstance(
        adapters, (list, tuple)) else None
    if not items or not all(isinstance(a, (str, Path)) for a in items):
        raise LayerwiseError(f"{_HOW}: adapters must be an adapter folder, a list of them or a Compiled, got "
                             f"{adapters!r}")
    yield [(Path(a).name, Path(a)) for a in items]


@dataclass
class _Adapter:
    name: str
    folder: Path
    kind: Any
    weights: dict[str, dict[str, torch.Tensor]]
    options: dict[str, dict]


def _read_adapter(item: tuple[str, Path]) -> _Adapter:
    from .merge_checkpoint import read_adapter

    name, folder = item
    try:
        adapter = read_adapter(folder)
    except SurgeonError as error:
        raise LayerwiseError(f"{_HOW}: adapter '{folder}': {error}") from error
    return _Adapter(name, folder, adapter.kind, adapter.weights, adapter.options)


def _example_ids(model: torch.nn.Module, example: Any) -> torch.Tensor:
    config = getattr(model, "config", None)
    if isinstance(example, torch.Tensor):
        if example.dtype not in (torch.int64, torch.int32) or example.dim() != 2 or example.is_meta:
            raise LayerwiseError(f"{_HOW}: example ids must be a 2-D integer tensor with values, got "
                                 f"{example.dtype}{list(example.shape)} on {example.device}")
        return example.to(torch.long)
    if example is None:
        batch, length = DEFAULT_EXAMPLE
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions >= 2:
            length = min(length, positions)
    elif isinstance(example, (tuple, list)) and len(example) == 2 and all(isinstance(d, int) and d >= 1
                                                                          for d in example):
        batch, length = example
    else:
        raise LayerwiseError(f"{_HOW}: example must be None, a shape like (2, 16) or a tensor of ids, got "
                             f"{example!r}")
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise LayerwiseError(f"{_HOW}: {type(model).__name__}'s config has no vocab_size to draw example ids "
                             "from; pass example ids")
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


class _Checkpoint:
    """A checkpoint folder's tensors by name, each read through its own short-lived handle."""

    def __init__(self, folder: Path, role: str):
        from . import merge_checkpoint as mc

        self.folder, self.role = folder, role
        try:
            headers = {shard: mc._read_header(folder / shard)[0] for shard in mc._shard_files(folder)}
        except SurgeonError as error:
            raise LayerwiseError(f"{_HOW}: the {role} checkpoint '{folder}': {error}") from error
        self.file = {name: folder / shard for shard, entries in headers.items() for name in entries}
        self.shape = {name: tuple(shape) for entries in headers.values() for name, (_, shape) in entries.items()}

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.file[name]), framework="pt") as handle:
            return handle.get_tensor(name)


# ---------------------------------------------------------------- the model's parts

def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """Every outermost nn.ModuleList of two or more modules of one class that hold parameters."""
    lists = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1 or not all(any(True for _ in m.parameters()) for m in module):
            continue
        if any(path.startswith(outer + ".") for outer, _ in lists):
            continue
        lists.append((path, module))
    return lists


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def split_model(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], list[tuple[str, torch.nn.Module]],
                                             list[tuple[str, torch.nn.Module, str]]]:
    """(blocks, other modules holding parameters outside them, parameters of the modules above the blocks)."""
    lists = _blocks(model)
    if not lists:
        raise LayerwiseUnsupported(f"{_HOW}: {type(model).__name__} cannot be checked layer by layer: it has no "
                                   "nn.ModuleList of repeated blocks (two or more modules of one class holding "
                                   "parameters), so there is nothing to split it into")
    list_paths = {path for path, _ in lists}
    above = {_join(*path.split(".")[:i]) for path in list_paths for i in range(len(path.split(".")))}
    blocks, others, resident = [], [], []

    def walk(module: torch.nn.Module, path: str) -> None:
        resident.extend((module, name, _join(path, name)) for name, p in module._parameters.items() if p is not None)
        for name, child in module.named_children():
            child_path = _join(path, name)
            if child_path in list_paths:
                blocks.extend((_join(child_path, str(i)), block) for i, block in enumerate(child))
            elif child_path in above:
                walk(child, child_path)
            elif any(True for _ in child.parameters()):
                others.append((child_path, child))
    walk(model, "")
    return blocks, others, resident


def _candidates(name: str, prefix: str) -> list[str]:
    """The names a model tensor or module may have in a checkpoint: its own, without or with the model's
    base prefix (GPT-2's hub checkpoints store `h.0...` for `transformer.h.0...`)."""
    names = [name]
    if prefix:
        names.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
    return names


def _tensor_names(model: torch.nn.Module, checkpoint: _Checkpoint) -> dict[str, str]:
    """Model tensor name -> checkpoint name, for every parameter and persistent buffer the checkpoint holds
    (a tied one under any of its names: lm_head.weight is stored as the embedding's)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    aliases: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        tensors = [(n, p) for n, p in module._parameters.items() if p is not None]
        tensors += [(n, b) for n, b in module._buffers.items()
                    if b is not None and n not in module._non_persistent_buffers_set]
        for name, tensor in tensors:
            aliases.setdefault(id(tensor), []).append(_join(path, name))
    found = {}
    for names in aliases.values():
        hit = next((c for n in names for c in _candidates(n, prefix) if c in checkpoint.file), None)
        if hit is not None:
            found.update(dict.fromkeys(names, hit))
    return found


# ---------------------------------------------------------------- adapters, unmerged

class _Branch(EagerBranch):
    """A kind's forward run eagerly at one module; reading the base weight or bias may be refused."""

    def __init__(self, dims: tuple[int, int], weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool,
                 refuse: str = ""):
        self._refuse = ""
        super().__init__(dims, weight)
        self.bias, self.transposed, self._refuse = bias, transposed, refuse

    def _read(self, value):
        if self._refuse:
            raise LayerwiseUnsupported(self._refuse)
        return value

    weight = property(lambda self: self._read(self._weight), lambda self, value: setattr(self, "_weight", value))
    bias = property(lambda self: self._read(self._bias), lambda self, value: setattr(self, "_bias", value))


@dataclass
class _Site:
    """One adapted module: its layout and, per adapter in merge order, (adapter, its parameters, options)."""

    path: str
    module: torch.nn.Module
    transposed: bool
    dims: tuple[int, int]
    adapters: list[tuple[_Adapter, dict[str, torch.Tensor], dict]] = field(default_factory=list)
    inputs: list[list[torch.Tensor]] = field(default_factory=list)


def _layout(model: torch.nn.Module, path: str, module: torch.nn.Module) -> tuple[bool, tuple[int, int]]:
    """(stored in x out, (in, out)) of an adapted module: an nn.Linear, or transformers' Conv1D (GPT-2)."""
    if isinstance(module, torch.nn.Linear):
        return False, (module.in_features, module.out_features)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        Conv1D = ()
    if isinstance(module, Conv1D):
        return True, tuple(module.weight.shape)
    raise LayerwiseUnsupported(f"{_HOW}: {type(model).__name__}'s module '{path}' ({type(module).__name__}) "
                               "carries an adapter, and only nn.Linear and Conv1D modules are run unmerged layer "
                               "by layer")


# ---------------------------------------------------------------- the run

class _Run:
    def __init__(self, model, base: _Checkpoint, merged: _Checkpoint, adapters: list[_Adapter], progress):
        self.model, self.base, self.merged, self.progress = model, base, merged, progress
        self.cls = type(model).__name__
        self.blocks, self.others, self.resident = split_model(model)
        self.names = _tensor_names(model, base)
        self.merged_names = _tensor_names(model, merged)
        self.sites = self._sites(adapters)
        self.targets = {f"{site.path}.{role}" for site in self.sites.values() for role in ("weight", "bias")}
        self.unmerged = True       # adapters run (the reference) or not (the merged checkpoint)
        self.read: set[str] = set()
        self.held = 0              # bytes of checkpoint data held now
        self.result = LayerwiseResult(self.cls, ())

    def _sites(self, adapters: list[_Adapter]) -> dict[str, _Site]:
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        modules = dict(self.model.named_modules())
        sites: dict[str, _Site] = {}
        for adapter in adapters:
            for stored in adapter.weights:
                path = next((c for c in _candidates(stored, prefix) if c in modules), None)
                if path is None:
                    raise LayerwiseError(f"{_HOW}: adapter '{adapter.folder}' names module '{stored}', which "
                                         f"{self.cls} (built from '{self.base.folder / 'config.json'}') lacks")
                module = modules[path]
                if path not in sites:
                    sites[path] = _Site(path, module, *_layout(self.model, path, module))
                weight = module.weight
                params = {p: t.to(weight.dtype) if t.is_floating_point() else t
                          for p, t in adapter.weights[stored].items()}
                sites[path].adapters.append((adapter, params, adapter.options[stored]))
            adapter.weights = {}   # the copies in the model's dtype are kept, the tensors as read go
        for site in sites.values():
            site.module.register_forward_pre_hook(lambda m, args, site=site: self._site_input(site, args))
            site.module.register_forward_hook(lambda m, args, out, site=site: self._site_output(site, out))
        return sites

    # ------------------------------------------------------------ the adapters' forward around a module

    def _branch(self, site: _Site, index: int) -> _Branch:
        adapter = site.adapters[index][0]
        refuse = "" if index == 0 else (
            f"{_HOW}: adapter '{adapter.name}' ({adapter.kind.name}) at '{site.path}' reads the module's weight, which "
            f"after adapter '{site.adapters[index - 1][0].name}' is that adapter's merged weight: a second adapter "
            "of such a kind on one module cannot be checked unmerged (merge and check the adapters one at a time)")
        module = site.module
        return _Branch(site.dims, module.weight, module.bias, site.transposed, refuse)

    def _site_input(self, site: _Site, args: tuple):
        if not self.unmerged:
            return None
        x, inputs = args[0], []
        for index in reversed(range(len(site.adapters))):   # the last-merged adapter is the outermost
            inputs.insert(0, x)
            adapter, params, options = site.adapters[index]
            if adapter.kind.forward_input is not None:
                x = adapter.kind.forward_input(self._branch(site, index), x, params, options)
        site.inputs.append(inputs)
        return (x, *args[1:])

    def _site_output(self, site: _Site, y: torch.Tensor):
        if not self.unmerged:
            return None
        inputs = site.inputs.pop()
        for index, (adapter, params, options) in enumerate(site.adapters):
            if adapter.kind.forward is not None:
                y = adapter.kind.forward(self._branch(site, index), inputs[index], y, params, options)
        return y

    # ------------------------------------------------------------ materializing one module

    def _load(self, path: str, module: torch.nn.Module, checkpoint: _Checkpoint, names: dict[str, str],
              restore: list, reference: bool) -> dict[str, torch.Tensor]:
        """Put `module`'s tensors from `checkpoint` in place of its meta ones (undone by `restore`);
        {checkpoint name: digest of the stored bytes} for the tensors no adapter touches."""
        kept = {}
        for sub_path, sub in module.named_modules(prefix=path):
            own = [("_parameters", n, t) for n, t in sub._parameters.items() if t is not None]
            own += [("_buffers", n, t) for n, t in sub._buffers.items()
                    if t is not None and n not in sub._non_persistent_buffers_set]
            for table, name, old in own:
                full = _join(sub_path, name)
                stored = names.get(full)
                if stored is None:
                    if table == "_buffers" and not old.is_meta:
                        continue   # computed by the model's code when it was built, not stored
                    raise LayerwiseError(f"{_HOW}: the {checkpoint.role} checkpoint '{checkpoint.folder}' has no "
                                         f"tensor for {self.cls}'s '{full}' ({list(old.shape)})")
                raw = checkpoint.read(stored)
                if tuple(raw.shape) != tuple(old.shape):
                    raise LayerwiseError(f"{_HOW}: tensor '{stored}' in the {checkpoint.role} checkpoint "
                                         f"'{checkpoint.folder}' has shape {list(raw.shape)}; {self.cls}'s '{full}' "
                                         f"has {list(old.shape)}")
                value = raw.to(old.dtype) if raw.is_floating_point() and old.is_floating_point() else raw
                if reference and table == "_parameters" and name == "weight" and sub_path in self.sites:
                    value = self._base_delta(self.sites[sub_path], value)
                self.held += value.nbytes + (raw.nbytes if value.data_ptr() != raw.data_ptr() else 0)
                getattr(sub, table)[name] = torch.nn.Parameter(value, requires_grad=False) \
                    if table == "_parameters" else value
                restore.append((sub, table, name, old))
                if reference:
                    self.read.add(stored)
                if full not in self.targets:
                    kept[stored] = _digest(raw)
        self.result.peak_bytes = max(self.result.peak_bytes, self.held)
        return kept

    def _base_delta(self, site: _Site, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as the first adapter runs on it: a kind that rewrites the base at insertion (PiSSA's
        residual W - s B0 A0) gets it rewritten the same way, from the same seed-0 init the merge uses. A later
        adapter that would rewrite it is refused: its base is the earlier adapter's merged weight."""
        out_x_in = weight.t() if site.transposed else weight
        for index, (adapter, _, options) in enumerate(site.adapters):
            if adapter.kind.base_delta is None:
                continue
            fresh = adapter.kind.init(options, out_x_in.shape[1], out_x_in.shape[0], weight.dtype,
                                      torch.Generator().manual_seed(0), out_x_in)
            delta = adapter.kind.base_delta(fresh, options, out_x_in)
            if delta is None:
                continue
            if index:
                raise LayerwiseUnsupported(
                    f"{_HOW}: adapter '{adapter.name}' ({adapter.kind.name}) at '{site.path}' rewrites the base "
                    f"weight it is inserted on, which after adapter '{site.adapters[0][0].name}' is that adapter's "
                    "merged weight: it cannot be checked unmerged (merge and check the adapters one at a time)")
            out_x_in = merged_weight(out_x_in, delta)   # the merge's own rounding of W + dW
        return (out_x_in.t() if site.transposed else out_x_in).contiguous()

    def _drop(self, restore: list) -> None:
        for sub, table, name, old in reversed(restore):
            getattr(sub, table)[name] = old
        restore.clear()

    # ------------------------------------------------------------ checking one module

    def _hooks(self, path: str, module: torch.nn.Module, checks: list[ModuleCheck], ordinal: str):
        state: list = []

        def before(mod, args, kwargs):
            recorded = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
            meta = next((i for i, t in enumerate(pytree.tree_leaves(recorded))
                         if isinstance(t, torch.Tensor) and t.is_meta), None)
            where = f"{self.cls}'s {ordinal} '{path}' ({type(mod).__name__})"
            if meta is not None:
                raise LayerwiseUnsupported(f"{_HOW}: {where} receives a meta tensor (input leaf {meta}): the "
                                           "model computes it from a weight outside the modules it calls, so it "
                                           "cannot be checked layer by layer")
            restore: list = []
            self.held = 0
            kept = self._load(path, mod, self.base, self.names, restore, reference=True)
            state.append((recorded, restore, kept, where, time.perf_counter()))

        def after(mod, args, kwargs, output):
            (rec_args, rec_kwargs), restore, kept_base, where, start = state.pop()
            expected = [t.detach() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
            size = self.held
            self._drop(restore)   # the reference weights go before the merged ones come
            self.held = 0
            self.unmerged = False
            try:
                kept = self._load(path, mod, self.merged, self.merged_names, restore, reference=False)
                self._same_bits(where, kept_base, kept)
                del kept_base, kept
                with torch.no_grad():
                    got = [t.detach() for t in pytree.tree_leaves(mod.forward(*rec_args, **rec_kwargs))
                           if isinstance(t, torch.Tensor)]
            finally:
                self._drop(restore)
                self.unmerged = True
                self.held = 0
            adapted = any(p == path or p.startswith(path + ".") for p in self.sites)
            mode = "close" if adapted else "exact"
            ok, check = compare(expected, got, mode, {p.dtype for p in mod.parameters() if p.is_floating_point()})
            if not ok:
                why = " (no adapter touches it: its output must be the base's bit for bit)" if mode == "exact" else ""
                raise LayerwiseError(f"{self._differs(where)}: {check}{why}")
            rel = 0.0 if mode == "exact" else float(check.rsplit(" ", 1)[-1])
            checks.append(ModuleCheck(path, type(mod).__name__, mode, rel, check, size, time.perf_counter() - start))
            self.result.largest_module_bytes = max(self.result.largest_module_bytes, size)
            if self.progress:
                self.progress(f"{_HOW}: {ordinal} '{path}': {check}")
        return (module.register_forward_pre_hook(before, with_kwargs=True),
                module.register_forward_hook(after, with_kwargs=True))

    def _differs(self, where: str) -> str:
        return f"{_HOW}: the merged checkpoint '{self.merged.folder}' differs from base + adapters at {where}"

    def _same_bits(self, where: str, base: dict[str, tuple], merged: dict[str, tuple]) -> None:
        """The merged checkpoint's tensors that no adapter touches are the base checkpoint's, bit for bit
        (their digests: dtype, shape and SHA-256 of the bytes)."""
        for name, digest in merged.items():
            if base.get(name) != digest:
                raise LayerwiseError(f"{self._differs(where)}: its tensor '{name}', which no adapter touches, is "
                                     "not the base checkpoint's bit for bit")

    # ------------------------------------------------------------ the whole model, once

    def run(self, ids: torch.Tensor) -> LayerwiseResult:
        start = time.perf_counter()
        result = self.result
        result.example = tuple(ids.shape)
        missing = sorted(set(self.base.file) ^ set(self.merged.file))
        if missing:
            raise LayerwiseError(f"{_HOW}: the merged checkpoint '{self.merged.folder}' and the base checkpoint "
                                 f"'{self.base.folder}' hold different tensors (e.g. '{missing[0]}'); a merge keeps "
                                 "every tensor name")
        handles = []
        resident: list = []
        try:
            for i, (path, block) in enumerate(self.blocks):
                handles += self._hooks(path, block, result.blocks, f"block {i + 1} of {len(self.blocks)}")
            for path, module in self.others:
                handles += self._hooks(path, module, result.others, "module")
            for owner, name, full in self.resident:   # parameters of the modules above the blocks: held throughout
                if full not in self.names:
                    raise LayerwiseError(f"{_HOW}: the base checkpoint '{self.base.folder}' has no tensor for "
                                         f"{self.cls}'s '{full}'")
                resident.append((owner, "_parameters", name, owner._parameters[name]))
                owner._parameters[name] = torch.nn.Parameter(self.base.read(self.names[full]).to(
                    owner._parameters[name].dtype), requires_grad=False)   # compared bit for bit below
            kwargs = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
            if self.progress:
                self.progress(f"{_HOW}: running {self.cls} on example ids {list(ids.shape)}, "
                              f"{len(self.blocks)} blocks one at a time")
            try:
                with torch.no_grad():
                    output = self.model(input_ids=ids, **kwargs)
            except LayerwiseError:
                raise
            except Exception as error:
                raise LayerwiseUnsupported(
                    f"{_HOW}: {self.cls} cannot be checked layer by layer: its forward on example ids "
                    f"{list(ids.shape)} raised {type(error).__name__}: {first_line(error)} (with only the module it "
                    "is calling materialized: a forward that reads a weight outside the modules it calls cannot be "
                    "split)") from error
            leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
            result.reference = leaves[0].detach() if leaves else None
        finally:
            for handle in handles:
                handle.remove()
            self._drop(resident)
        self._unreached()
        result.seconds = time.perf_counter() - start
        return result

    def _unreached(self) -> None:
        """Every tensor the forward did not read: an adapted one is an error (nothing computed it), any
        other must be the base checkpoint's bit for bit."""
        stored_targets = {self.names[t]: t for t in self.targets if t in self.names}
        for name in sorted(set(self.base.file) - self.read):
            if name in stored_targets:
                raise LayerwiseUnsupported(
                    f"{_HOW}: {self.cls}'s forward on the example never ran '{stored_targets[name]}', which an "
                    f"adapter changes, so its merged tensor '{name}' cannot be checked layer by layer")
            self._same_bits(f"a tensor {self.cls}'s forward on the example does not read",
                            {name: _digest(self.base.read(name))}, {name: _digest(self.merged.read(name))})
            self.result.unreached += 1


def _digest(tensor: torch.Tensor) -> tuple:
    """dtype, shape and the SHA-256 of a tensor's bytes: equal exactly when the tensors are equal bit for bit."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return str(tensor.dtype), tuple(tensor.shape), hashlib.sha256(data).digest()
