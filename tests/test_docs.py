"""Docs that cannot rot: every fenced example in README.md and docs/*.md is run or checked.

What a fenced block's info string asks for (the same table is in docs/architecture.md, "Docs that cannot rot"):

  ```python             run as it is: a fresh namespace, a fresh temporary working directory, seed 0
  ```python no-run      compiled only (a fragment showing an API's shape); an HTML comment right
                        above the fence must say why it cannot run
  ```yaml               surgeon.load_spec; a whole spec (top-level `adapters` or `pipeline`) is then
                        compiled with surgeon.compile on surgeon.models.tiny_llama(seed=0)
  ```yaml model=NAME    the same on another model: tiny_llama, small_cnn, hf_llama, hf_gpt2, hf_bert
                        (tests/conftest.py; transformers builds them from configs, offline)
  ```yaml fragment      parsed as YAML only (a piece of a spec, or one naming folders that are not
                        there); needs the HTML comment saying why, like no-run
  ```toml               tomllib, then like yaml (model=NAME and fragment work the same)
  ```bash               each command is checked, not run: `bash scripts/X.sh` and `python F.py` name
                        files that exist, `surgeon SUB ...` (also after `bash scripts/env.sh`) names a
                        subcommand, and every --option it names is one of SUB's (`surgeon SUB --help`);
                        a line with `[` is read as a synopsis: the same checks, without shell parsing
  anything else         (```text, ```json, ...) not checked

Each block is one test, named by file:line of its opening fence, so a failure names the block.
Relative links between the pages must resolve, anchors included; docs/passes.md, docs/adapters.md and
docs/cli.md must name every registered pass and option, adapter kind and option, and command-line option.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED = {"python", "yaml", "toml", "bash"}
MODELS = ("tiny_llama", "small_cnn", "hf_llama", "hf_gpt2", "hf_bert")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int            # 1-based line of the opening fence
    lang: str
    flags: frozenset
    options: tuple       # (key, value) pairs from key=value words of the info string
    code: str
    reason: str          # the HTML comment right above the fence ("" when none)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page (``` or ~~~ fences, up to three spaces of indent)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^( {0,3})(`{3,}|~{3,})\s*(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        words = info.split()
        lang = words[0].lower() if words else ""
        flags = frozenset(w for w in words[1:] if "=" not in w)
        options = tuple(tuple(w.split("=", 1)) for w in words[1:] if "=" in w)
        found.append(Block(page, start + 1, lang, flags, options, "\n".join(body) + "\n", _comment_above(lines, start)))
    return found


def _comment_above(lines: list[str], fence: int) -> str:
    """The HTML comment ending on the line above `fence` (blank lines between allowed)."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return ""
    text = [lines[j]]
    while "<!--" not in text[0] and j > 0:
        j -= 1
        text.insert(0, lines[j])
    joined = " ".join(t.strip() for t in text)
    return joined[joined.find("<!--") + 4:joined.rfind("-->")].strip()


ALL = [b for page in PAGES for b in blocks(page) if b.lang in CHECKED]


def _by(lang: str) -> list:
    return [pytest.param(b, id=b.where) for b in ALL if b.lang == lang]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder and a private kernel cache in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SURGEON_KERNEL_CACHE", str(tmp_path / ".kernels"))
    return tmp_path


def _needs_reason(block: Block, flag: str) -> None:
    if flag in block.flags:
        assert block.reason, (f"{block.where}: a ```{block.lang} {flag} block needs an HTML comment right above "
                              "its fence saying why it is not run")


# ---------------------------------------------------------------- python

@pytest.mark.parametrize("block", _by("python"))
def test_python_block(block: Block, workdir, monkeypatch):
    code = compile(block.code, block.where, "exec")
    unknown = block.flags - {"no-run"}
    assert not unknown, f"{block.where}: unknown fence flags {sorted(unknown)}"
    _needs_reason(block, "no-run")
    if "no-run" in block.flags:
        return
    torch.manual_seed(0)
    module = types.ModuleType("__docs__")    # a real module: dataclasses look their class's module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, module.__dict__)   # noqa: S102 - the docs' own examples


# ---------------------------------------------------------------- yaml / toml specs

def _model(name: str):
    """(model, args, kwargs) of a named test model."""
    assert name in MODELS, f"model={name}: not one of {MODELS}"
    if name == "tiny_llama":
        from surgeon.models import tiny_llama

        model, args = tiny_llama(seed=0)
        return model, args, None
    from tests import conftest

    made = getattr(conftest, name)()
    model, args, kwargs = made if len(made) == 3 else (*made, None)
    if name in ("hf_llama", "hf_gpt2"):
        kwargs = {**(kwargs or {}), "use_cache": False}
    return model, args, kwargs


def _check_spec(block: Block, source) -> None:
    """`source`: YAML text (read by surgeon's own YAML 1.2 loader) or a dict (from TOML)."""
    import surgeon

    unknown = block.flags - {"fragment"}
    assert not unknown, f"{block.where}: unknown fence flags {sorted(unknown)}"
    _needs_reason(block, "fragment")
    if "fragment" in block.flags:
        return
    spec = surgeon.load_spec(source)
    if spec.adapters or spec.pipeline:
        model, args, kwargs = _model(block.option("model", "tiny_llama"))
        compiled = surgeon.compile(model, args, spec, kwargs)
        assert len(compiled.report.rows) == 1 + len(spec.pipeline), str(compiled.report)


@pytest.mark.parametrize("block", _by("yaml"))
def test_yaml_block(block: Block, workdir):
    yaml.safe_load(block.code)   # well-formed YAML, fragments included
    _check_spec(block, block.code)


@pytest.mark.parametrize("block", _by("toml"))
def test_toml_block(block: Block, workdir):
    data = tomllib.loads(block.code)
    _check_spec(block, data)


# ---------------------------------------------------------------- bash

def _surgeon_help(argv: list[str]) -> tuple[int, str]:
    from surgeon.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as done:
            status = done.code or 0
    return status, out.getvalue() + err.getvalue()


def _check_surgeon(where: str, words: list[str]) -> None:
    """`surgeon SUB --opt ...`: SUB is a subcommand and each --opt one of its options (or a global one)."""
    sub = next((w for w in words if not w.startswith("-")), None)
    assert sub, f"{where}: `surgeon` without a subcommand"
    status, text = _surgeon_help([sub, "--help"])
    assert status == 0, f"{where}: `surgeon {sub}` is not a subcommand: {text.strip().splitlines()[-1:]}"
    _, top = _surgeon_help(["--help"])
    for word in words:
        option = word.split("=", 1)[0]
        if option.startswith("--") and option != "--":
            pattern = rf"(?<![\w-]){re.escape(option)}(?![\w-])"
            assert re.search(pattern, text) or re.search(pattern, top), \
                f"{where}: `surgeon {sub}` has no option {option}"


def _check_command(where: str, words: list[str]) -> None:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):   # VAR=value prefixes
        words = words[1:]
    if not words:
        return
    head = words[0]
    if head == "bash" and len(words) > 1:
        script = words[1]
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        if script == "scripts/env.sh":
            _check_command(where, words[2:])
        return
    if head in ("python", "python3") or head.endswith("/python"):
        if words[1:2] == ["-m"]:
            module = words[2] if len(words) > 2 else ""
            if module == "surgeon":
                _check_surgeon(where, words[3:])
            elif module == "pytest":
                for word in words[3:]:
                    if word.startswith("tests/"):
                        assert (ROOT / word.split("::")[0]).exists(), f"{where}: {word} does not exist"
            return
        script = next((w for w in words[1:] if not w.startswith("-")), None)
        if script and script.endswith(".py"):
            assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
            source = (ROOT / script).read_text(encoding="utf-8")
            for module in re.findall(r"^from (surgeon[\w.]*) import main\b", source, flags=re.M):   # a thin wrapper
                path = ROOT / module.replace(".", "/")
                source += next((p.read_text(encoding="utf-8") for p in (path.with_suffix(".py"), path / "__init__.py")
                                if p.is_file()), "")
            for word in words[words.index(script) + 1:]:
                option = word.split("=", 1)[0]
                if option.startswith("--"):
                    named = rf"""["']({re.escape(option)}|{re.escape(option[2:])})["']"""   # "--rounds", or f"--{name}"
                    assert re.search(named, source), f"{where}: {script} takes no option {option}"
        return
    if head == "surgeon":
        _check_surgeon(where, words[1:])


def _commands(code: str) -> list[tuple[int, str]]:
    """(offset, command line) per command, continuation lines joined."""
    out, pending, first = [], "", 0
    for offset, line in enumerate(code.splitlines()):
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return [(o, c) for o, c in out if c.strip() and not c.strip().startswith("#")]


@pytest.mark.parametrize("block", _by("bash"))
def test_bash_block(block: Block):
    for offset, line in _commands(block.code):
        where = f"{block.where}+{offset + 1}"
        if "[" in line.split("#", 1)[0]:   # a synopsis: `surgeon show DIR [--filter GLOB] ...`
            synopsis = line.split("#", 1)[0]
            match = re.search(r"(?:^|\s)surgeon\s+(.*)$", synopsis)
            if match:
                _check_surgeon(where, re.findall(r"[\w.-]+|--[\w-]+", match.group(1)))
            continue
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in words + [";"]:
            if word in (";", "&&", "||", "|"):
                _check_command(where, command)
                command = []
            else:
                command.append(word)


# ---------------------------------------------------------------- links

def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page."""
    out = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"^ {0,3}(`{3,}|~{3,})", line):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading.group(1)).strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


LINKS = [(page, link) for page in PAGES
         for link in dict.fromkeys(re.findall(r"\]\((?!https?:|mailto:)([^)\s]+)\)", page.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page,link", [pytest.param(p, link, id=f"{p.relative_to(ROOT)}->{link}")
                                       for p, link in LINKS])
def test_link_resolves(page: Path, link: str):
    target, _, anchor = link.partition("#")
    path = (page.parent / target).resolve() if target else page
    assert path.exists(), f"{page.relative_to(ROOT)}: link to {link}: {target} does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in _anchors(path), f"{page.relative_to(ROOT)}: link to {link}: no heading with that anchor"


def test_every_block_is_seen():
    """The extractor finds the pages' blocks (a fence it cannot read would silently check nothing)."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        opened = len(re.findall(r"^ {0,3}(?:`{3,}|~{3,})[ \t]*\S", text, flags=re.M))
        assert opened == len(blocks(page)), f"{page.relative_to(ROOT)}: {opened} fences opened, " \
                                            f"{len(blocks(page))} blocks read"


# ---------------------------------------------------------------- reference pages name everything

def _sections(page: Path) -> dict[str, str]:
    """Heading text (backticks dropped) -> the text under it, up to the next heading."""
    out, title, lines, in_fence = {}, None, [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if re.match(r"^ {0,3}(`{3,}|~{3,})", line):
            in_fence = not in_fence
        heading = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            if title is not None:
                out[title] = "\n".join(lines)
            title, lines = heading.group(1).replace("`", ""), []
        else:
            lines.append(line)
    if title is not None:
        out[title] = "\n".join(lines)
    return out


def test_every_pass_and_option_is_in_passes_md():
    import dataclasses

    from surgeon.passes import passes

    sections = _sections(ROOT / "docs" / "passes.md")
    for name, cls in passes().items():
        assert name in sections, f"docs/passes.md has no section '## {name}' (or ###)"
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in sections[name], f"docs/passes.md, section {name}: option `{field.name}` missing"


def test_every_adapter_kind_and_option_is_in_adapters_md():
    from surgeon.adapters import kinds

    text = (ROOT / "docs" / "adapters.md").read_text(encoding="utf-8")
    for name, kind in kinds().items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` ")]
        assert rows, f"docs/adapters.md has no table row for the '{name}' kind"
        for option in kind.options:
            assert any(f"`{option}`" in row for row in rows), f"docs/adapters.md: option `{option}` of '{name}' missing"


def test_every_command_and_option_is_in_cli_md():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = _sections(ROOT / "docs" / "cli.md")
    _, top = _surgeon_help(["--help"])
    commands = re.search(r"\{([\w,-]+)\}", top).group(1).split(",")
    for command in commands:
        assert f"surgeon {command}" in sections, f"docs/cli.md has no section '## `surgeon {command}`'"
        _, usage = _surgeon_help([command, "--help"])
        for option in sorted(set(re.findall(r"(?<![\w-])--[a-z][\w-]*", usage)) - {"--help"}):
            assert option in text, f"docs/cli.md: `surgeon {command} {option}` is not documented"


def test_readme_kind_table_is_made_from_the_code_and_adapters_md():
    """README.md's kind table is scripts/kind_table.py's output (rerun it with --write after adding a kind)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kind_table", ROOT / "scripts" / "kind_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    held = module.readme_table((ROOT / "README.md").read_text(encoding="utf-8"))
    assert held is not None, "README.md has no kind table markers"
    assert held == module.table(), "README.md's kind table is stale: run python scripts/kind_table.py --write"
