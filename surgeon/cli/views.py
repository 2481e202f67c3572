"""Command-line views of saved compiles: `surgeon show DIR --dot/--svg/--html OUT` and `surgeon diff`.

A saved compile is a folder written by Compiled.save (nodes.json, report.json and, when the
compile kept its snapshot, nodes_before.json); a nodes.json file may be named directly.

    surgeon show out/ --html graph.html        # the interactive view (before/after when saved)
    surgeon show out/ --svg graph.svg --depth 3 # Graphviz render, modules 3 levels down as boxes
    surgeon diff out/                           # this compile: captured graph -> result
    surgeon diff a/ b/ --html diff.html         # two compiles, by module path

Guarantees: every failure is a SurgeonError whose message names the file or option at fault. An
OUT's folder must exist (it is not created); an OUT that is a symlink is replaced, never written
through.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

from ..errors import SurgeonError
from ..safe_io import check_out_file, write_text_nofollow


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SurgeonError(f"cannot read '{path}': {error}") from error


def load_saved(where: str | Path) -> tuple[list[dict], list[dict] | None, dict | None]:
    """(nodes, nodes_before or None, report or None) from a saved folder or a nodes.json file."""
    where = Path(where)
    folder, nodes_file = (where.parent, where) if where.is_file() else (where, where / "nodes.json")
    if not nodes_file.is_file():
        raise SurgeonError(f"'{where}' is not a saved compile (no nodes.json); write one with surgeon compile --out")
    nodes = _read_json(nodes_file)
    before_file, report_file = folder / "nodes_before.json", folder / "report.json"
    before = _read_json(before_file) if before_file.is_file() and where.is_dir() else None
    report = _read_json(report_file) if report_file.is_file() else None
    return nodes, before, report


def _filtered(nodes: list[dict] | None, glob: str) -> list[dict] | None:
    if nodes is None or glob == "*":
        return nodes
    return [n for n in nodes if fnmatch.fnmatchcase(n["path"], glob) or n["op"] in ("placeholder", "output")]


def _write(path: str, text: str) -> None:
    write_text_nofollow(path, text)
    print(f"wrote {path}")


def _check_outputs(ns, *options: str) -> None:
    """Before any work: each OUT's folder exists (it is not created) and OUT is not a folder."""
    for option in options:
        if getattr(ns, option):
            check_out_file(getattr(ns, option), f"--{option}")


def cmd_show_views(ns) -> int:
    """Write the DOT, SVG and/or HTML view of a saved compile."""
    from ..visualize import auto_depth, to_dot, to_html, to_svg

    _check_outputs(ns, "dot", "svg", "html")
    nodes, before, report = load_saved(ns.dir)
    nodes, before = _filtered(nodes, ns.filter), _filtered(before, ns.filter)
    title = f"surgeon: {(report or {}).get('model', Path(ns.dir).name)}"
    if ns.dot or ns.svg:
        depth = ns.depth
        if depth is None and ns.svg:   # Graphviz takes minutes on thousands of nodes: draw deep modules as boxes
            depth = auto_depth(nodes, params=not ns.no_params)
            if depth is not None:
                print(f"drawing modules {depth} levels down as one box each (choose with --depth)")
        dot = to_dot(nodes, before=before, report=report, depth=depth, params=not ns.no_params, title=title)
        if ns.dot:
            _write(ns.dot, dot)
        if ns.svg:
            _write(ns.svg, to_svg(dot))
    if ns.html:
        _write(ns.html, to_html(before, nodes, report, title))
    return 0


def cmd_diff(ns) -> int:
    """Print what changed between two saved compiles (or one compile's before and after)."""
    from ..visualize import diff, to_html

    _check_outputs(ns, "html")
    if ns.b is None:
        after, before, report = load_saved(ns.a)
        if before is None:
            raise SurgeonError(f"'{ns.a}' has no nodes_before.json; name two saved compiles: surgeon diff A B")
        before_report, label = None, f"{ns.a}: captured -> compiled"
    else:
        before, _, before_report = load_saved(ns.a)
        after, _, report = load_saved(ns.b)
        label = f"{ns.a} -> {ns.b}"
    result = diff(before, after, report, before_report)
    print(f"diff {label}\n{result.summary(depth=ns.depth, list_nodes=ns.nodes)}")
    if ns.html:
        _write(ns.html, to_html(before, after, report, f"surgeon diff: {label}"))
    return 0


def _depth(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_view_options(show: argparse.ArgumentParser) -> None:
    """Give `surgeon show` the --dot/--svg/--html outputs; without them it prints as before."""
    plain = show.get_default("fn")
    show.epilog = "An OUT's folder must exist; a symlink at OUT is replaced, never written through."
    show.add_argument("--dot", metavar="OUT", help="write the graph as Graphviz DOT")
    show.add_argument("--svg", metavar="OUT", help="render the graph to SVG (needs Graphviz: apt-get install graphviz)")
    show.add_argument("--html", metavar="OUT", help="write the interactive HTML view (one self-contained file)")
    show.add_argument("--depth", type=_depth, help="DOT/SVG: draw modules this many levels down as one box each "
                                                   "(SVG default: deep enough for at most 150 boxes)")
    show.add_argument("--no-params", action="store_true", help="DOT/SVG: leave out parameter (get_attr) nodes")

    def run(ns) -> int:
        return cmd_show_views(ns) if (ns.dot or ns.svg or ns.html) else plain(ns)

    show.set_defaults(fn=run)


def add_diff_command(sub) -> argparse.ArgumentParser:
    """Register `surgeon diff A [B] [--html OUT]` on the main parser's subparsers."""
    p = sub.add_parser("diff", help="what changed, by module path: one compile's before/after, or two compiles")
    p.add_argument("a", help="a saved compile (with nodes_before.json when B is not given)")
    p.add_argument("b", nargs="?", help="a second saved compile, compared with A")
    p.add_argument("--html", metavar="OUT", help="also write the HTML view of the diff (into an existing folder; "
                                                 "a symlink at OUT is replaced, never written through)")
    p.add_argument("--depth", type=_depth, help="group module paths to this many levels")
    p.add_argument("--nodes", action="store_true", help="also list every changed node")
    p.set_defaults(fn=cmd_diff)
    return p
