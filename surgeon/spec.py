"""The declarative spec: adapters and a pipeline of passes, from YAML, TOML or a dict.

Everything here is checked before anything is compiled; each problem raises SpecError naming
the key (e.g. `adapters[1].rank`) and, when the spec came from a YAML file, its line. Pass entries
are checked against a table of pass classes the caller hands in (`surgeon.load_spec` hands in
surgeon.passes.passes()): the passes build on this module, so it never imports them.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .adapters import AdapterKind, kinds
from .errors import SpecError

TOP_KEYS = {"adapters", "pipeline", "seed", "verify", "static_shapes"}
ADAPTER_KEYS = {"name", "type", "targets", "exclude", "from_peft", "from_dir", "allow_nonfinite", "allow_partial"}


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    type: str
    targets: tuple[str, ...]
    options: dict[str, Any]
    exclude: tuple[str, ...] = ()
    from_peft: Path | None = None
    from_dir: Path | None = None
    loaded: Any = None   # a LoadedAdapter (weights and per-site options) for from_peft / from_dir
    allow_partial: bool = False   # a loaded adapter may leave modules it holds tensors for unplaced

    @property
    def kind(self) -> AdapterKind:
        return kinds()[self.type]


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Spec:
    adapters: tuple[AdapterSpec, ...]
    pipeline: tuple[PassSpec, ...]
    seed: int = 0
    verify: bool = True
    source: str | None = None
    static_shapes: bool = False
    lines: dict = field(default_factory=dict, repr=False, compare=False)

    def adapter(self, name: str) -> AdapterSpec:
        return next(a for a in self.adapters if a.name == name)

    def error(self, key: tuple, message: str) -> SpecError:
        """A SpecError for the key path `key`, with its file line when known."""
        return SpecError(_key_text(key), message, self.lines.get(tuple(key)), self.source)


def _key_text(key: tuple) -> str:
    text = ""
    for atom in key:
        text += f"[{atom}]" if isinstance(atom, int) else (f".{atom}" if text else str(atom))
    return text or "<spec>"


def load_spec(spec: "str | Path | dict | Spec", passes: Mapping[str, type] | None = None) -> Spec:
    """Parse and validate a spec from a YAML/TOML file path, YAML text, or a dict; `passes` is the
    table of pass classes by name its pipeline entries are checked against (none: no entries)."""
    if isinstance(spec, Spec):
        return spec
    lines: dict = {}
    source = None
    if isinstance(spec, (dict, list)):
        data = spec
    elif not isinstance(spec, (str, Path)):
        raise SpecError("<spec>", f"must be a file path, YAML text or a dict, got {type(spec).__name__}")
    else:
        text, source = _read_text(spec)
        if source and source.endswith(".toml"):
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as error:
                raise SpecError("<spec>", f"not valid TOML: {error}", source=source) from error
        else:
            try:
                data = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
                lines = _yaml_lines(yaml.compose(text, Loader=_Yaml12Loader))
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                raise SpecError("<spec>", f"not valid YAML: {error}", mark.line + 1 if mark else None,
                                source) from error
    return _validate(data, source, lines, passes or {})


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads booleans: only true/false. PyYAML's 1.1 rules turn `on`, `off`,
    `yes` and `no` into booleans, so IA3's `on: input` would arrive as the key True."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _read_text(spec: "str | Path") -> tuple[str, str | None]:
    path = Path(spec)
    if isinstance(spec, Path) or (len(str(spec)) < 4096 and "\n" not in str(spec)
                                  and str(spec).endswith((".yaml", ".yml", ".toml", ".json"))):
        if not path.is_file():
            raise SpecError("<spec>", f"spec file '{path}' does not exist")
        return path.read_text(), str(path)
    return str(spec), None


def _yaml_lines(node, key: tuple = ()) -> dict:
    """Map each key path of a composed YAML document to its 1-based line."""
    out: dict = {}
    if node is None:
        return out
    out[key] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[key + (k.value,)] = k.start_mark.line + 1
            sub = _yaml_lines(v, key + (k.value,))
            sub.pop(key + (k.value,), None)
            out.update(sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_yaml_lines(v, key + (i,)))
    return out


def _validate(data: Any, source: str | None, lines: dict, table: Mapping[str, type]) -> Spec:
    shell = Spec((), (), source=source, lines=lines)
    if not isinstance(data, dict):
        raise shell.error((), f"must be a mapping with 'adapters' and 'pipeline', got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise shell.error((key,), f"unknown key; expected one of {sorted(TOP_KEYS)}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise shell.error(("seed",), f"must be an integer, got {seed!r}")
    verify = data.get("verify", True)
    if not isinstance(verify, bool):
        raise shell.error(("verify",), f"must be true or false, got {verify!r}")
    static_shapes = data.get("static_shapes", False)
    if not isinstance(static_shapes, bool):
        raise shell.error(("static_shapes",), f"must be true or false, got {static_shapes!r}")
    raw_adapters = data.get("adapters", [])
    if not isinstance(raw_adapters, list):
        raise shell.error(("adapters",), "must be a list of adapter entries")
    adapters = tuple(_adapter(shell, i, entry) for i, entry in enumerate(raw_adapters))
    seen: set[str] = set()
    for i, adapter in enumerate(adapters):
        if adapter.name in seen:
            raise shell.error(("adapters", i, "name"), f"duplicate adapter name '{adapter.name}'")
        seen.add(adapter.name)
    raw_pipeline = data.get("pipeline", ["insert"] if adapters else [])
    if not isinstance(raw_pipeline, list):
        raise shell.error(("pipeline",), "must be a list of pass names or {name: {options}}")
    pipeline = []
    for i, entry in enumerate(raw_pipeline):
        pipeline.append(_pass(shell, i, entry, seen, table))
        if pipeline[-1].name == "combine":   # later passes may name the combined adapter
            options = pipeline[-1].options
            seen.add(options.get("into") or "_".join(options.get("adapters", ())) + f"_{options.get('method')}")
    pipeline = tuple(pipeline)
    return Spec(adapters, pipeline, seed, verify, source, lines=lines, static_shapes=static_shapes)


def _adapter(shell: Spec, i: int, entry: Any) -> AdapterSpec:
    at = ("adapters", i)
    if not isinstance(entry, dict):
        raise shell.error(at, f"must be a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise shell.error(at + ("name",), f"missing or not an identifier: {name!r}")
    loaded = None
    if "from_peft" in entry or "from_dir" in entry:
        from .adapter_io import load_adapter_dir, load_peft_dir

        key = "from_peft" if "from_peft" in entry else "from_dir"
        reader = load_peft_dir if key == "from_peft" else _surgeon_dir_reader(Path(entry[key]), load_adapter_dir)
        allow = entry.get("allow_nonfinite", False)
        if not isinstance(allow, bool):
            raise shell.error(at + ("allow_nonfinite",), f"must be true or false, got {allow!r}")
        try:
            loaded = reader(Path(entry[key]), allow_nonfinite=allow)
        except SpecError as error:
            raise shell.error(at + (key,), str(error)) from error
        entry = {**loaded.entry, **{k: v for k, v in entry.items() if k not in ("type",)}}
    kind_name = entry.get("type")
    table = kinds()
    if kind_name not in table:
        raise shell.error(at + ("type",), f"unknown adapter type {kind_name!r}; known: {sorted(table)}")
    kind = table[kind_name]
    for key in entry:
        if key not in ADAPTER_KEYS and key not in kind.options:
            raise shell.error(at + (key,), f"unknown key for a '{kind_name}' adapter; expected one of "
                                           f"{sorted(ADAPTER_KEYS | set(kind.options))}")
    targets = _globs(shell, at + ("targets",), entry.get("targets"), required=True)
    exclude = _globs(shell, at + ("exclude",), entry.get("exclude", []), required=False)
    options = {}
    for key, option in kind.options.items():
        value = entry.get(key, option.default)
        options[key] = _check_option(shell, at + (key,), value, option)
    allow_partial = entry.get("allow_partial", False)
    if not isinstance(allow_partial, bool):
        raise shell.error(at + ("allow_partial",), f"must be true or false, got {allow_partial!r}")
    return AdapterSpec(name, kind_name, targets, options, exclude,
                       Path(entry["from_peft"]) if "from_peft" in entry else None,
                       Path(entry["from_dir"]) if "from_dir" in entry else None, loaded, allow_partial)


def _surgeon_dir_reader(directory: Path, plain):
    """The loader for a surgeon adapter folder: quantized folders decode through quantized_io."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return plain   # the plain loader reports what is missing or malformed
    if isinstance(config, dict) and "quantized" in config:
        from .quantized_io import load_quantized_adapter

        return load_quantized_adapter
    return plain


def _globs(shell: Spec, key: tuple, value: Any, required: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (required and not value):
        raise shell.error(key, f"must be a non-empty list of module-path globs, got {value!r}")
    return tuple(value)


def _check_option(shell: Spec, key: tuple, value: Any, option) -> Any:
    if value is None and option.default is None:
        return None
    if isinstance(value, bool) and option.type is not bool:
        raise shell.error(key, f"must be {_type_name(option.type)}, got {value!r}")
    if option.type is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, option.type):
        raise shell.error(key, f"must be {_type_name(option.type)}, got {value!r}")
    if option.positive and not value > 0:
        raise shell.error(key, f"must be positive, got {value!r}")
    if option.bounds and not option.bounds[0] <= value <= option.bounds[1]:
        raise shell.error(key, f"must be in [{option.bounds[0]:g}, {option.bounds[1]:g}], got {value!r}")
    if option.choices and value not in option.choices:
        raise shell.error(key, f"must be one of {list(option.choices)}, got {value!r}")
    return value


def _type_name(t) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def _pass(shell: Spec, i: int, entry: Any, adapter_names: set[str], table: Mapping[str, type]) -> PassSpec:
    at = ("pipeline", i)
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        options = options or {}
        at = at + (name,)
    else:
        raise shell.error(at, f"must be a pass name or {{name: {{options}}}}, got {entry!r}")
    if name not in table:
        raise shell.error(at, f"unknown pass {name!r}; known: {sorted(table)}")
    if not isinstance(options, dict):
        raise shell.error(at, f"options must be a mapping, got {options!r}")
    fields = {f.name: f for f in dataclasses.fields(table[name])}
    for key, value in options.items():
        if key not in fields:
            raise shell.error(at + (key,), f"unknown option for pass '{name}'; expected one of {sorted(fields)}")
    names = options.get("adapters")
    if names is not None:
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise shell.error(at + ("adapters",), f"must be a list of adapter names, got {names!r}")
        for n in names:
            if n not in adapter_names:
                raise shell.error(at + ("adapters",), f"names unknown adapter '{n}'; declared: {sorted(adapter_names)}")
        options = {**options, "adapters": tuple(names)}
    try:   # the pass checks its own option values; report them at this spec position
        table[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except (SpecError, ValueError, TypeError) as error:
        message = error.args[-1] if isinstance(error, SpecError) else str(error)
        raise shell.error(at, f"bad options for pass '{name}': {message}") from error
    return PassSpec(name, options)


def spec_to_dict(spec: Spec) -> dict:
    """A plain, JSON/YAML-writable form of the spec (loaded weights by folder reference)."""
    adapters = []
    for a in spec.adapters:
        entry = {"name": a.name, "type": a.type, "targets": list(a.targets), **a.options}
        if a.exclude:
            entry["exclude"] = list(a.exclude)
        adapters.append(entry)
    pipeline = [p.name if not p.options else {p.name: json.loads(json.dumps(p.options, default=list))}
                for p in spec.pipeline]
    return {"adapters": adapters, "pipeline": pipeline, "seed": spec.seed, "verify": spec.verify,
            **({"static_shapes": True} if spec.static_shapes else {})}
