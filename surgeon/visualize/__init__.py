"""Graph views of a compile: DOT / SVG export, a self-contained HTML viewer, and a structured diff.

    from surgeon.visualize import diff, to_dot, to_svg, to_html, write_views
    write_views("out/", nodes_before, nodes_after, report_dict)   # out/graph.html, out/graph.dot

Inputs are node tables as `surgeon.compiled.node_table` writes them (nodes.json). A node's colour
says what happened to it (surgeon.visualize.diff.STATUS): inserted by an adapter pass, weight
rewritten by a merge, folded, permuted, fused into a kernel, removed ... derived from its
creating pass and from the before/after difference by node name.

Guarantees: `to_dot` emits one cluster per module path (nested like the module tree) and
quotes every identifier; `to_svg` runs Graphviz's `dot` or raises SurgeonError naming the
package to install; `to_html` returns one file that loads nothing over the network; `write_views`
never writes through a symlink (surgeon.safe_io).

The package reads node tables only (plain data, as nodes.json holds them): it may import
surgeon.errors, surgeon.report (its table printer) and surgeon.safe_io, never the graph, the
passes or the kernels, so a saved compile's folder is all it needs.
Modules: diff.py (what happened to each node), html.py with script.py and script_ui.py (the page
and its script), this file (DOT, SVG and writing the views).
"""
from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

from ..errors import SurgeonError
from ..safe_io import write_text_nofollow
from .diff import STATUS, GraphDiff, diff, pass_kind
from .html import to_html

__all__ = ["diff", "GraphDiff", "STATUS", "pass_kind", "to_dot", "auto_depth", "to_svg", "to_html", "write_views"]


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def short_target(target: str) -> str:
    """`aten.linear.default` -> `linear`; other targets unchanged."""
    return target.removeprefix("aten.").removesuffix(".default")


def _cut(path: str, depth: int | None) -> str:
    return ".".join(path.split(".")[:depth]) if depth is not None and path else path


def to_dot(nodes: list[dict], *, before: list[dict] | None = None, report: dict | None = None,
           depth: int | None = None, params: bool = True, title: str = "surgeon") -> str:
    """DOT text: a cluster per module path, nodes filled by status; with `depth` (>= 1), the modules
    `depth` levels down are one box each."""
    if depth is not None and depth < 1:
        raise SurgeonError(f"depth must be at least 1, got {depth}")
    graph = diff(before, nodes, report)
    shown = [n for n in graph.nodes if params or n["op"] != "get_attr"]
    item_of: dict[str, str] = {}                 # node name -> DOT id of what shows it
    members: dict[str, list[str]] = {}           # cluster path -> DOT node statements
    boxes: dict[str, list[dict]] = {}            # collapsed module path -> its nodes
    for node in shown:
        if depth is not None and node["path"] and node["path"].count(".") + 1 >= depth:
            cut = _cut(node["path"], depth)
            boxes.setdefault(cut, []).append(node)
            item_of[node["name"]] = f"module:{cut}"
            continue
        item_of[node["name"]] = node["name"]
        members.setdefault(node["path"], []).append(_node_statement(node))
    for cut, inside in boxes.items():
        members.setdefault(cut.rpartition(".")[0], []).append(_box_statement(cut, inside))
    lines = ["digraph surgeon {",
             f"  graph [rankdir=TB, fontname=Helvetica, fontsize=12, labelloc=t, label={_quote(title)}];",
             "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
             "  edge [color=\"#7d8593\", arrowsize=0.6];"]
    lines += _clusters(members, "", 1)
    lines += _edges(graph, shown, item_of)
    return "\n".join(lines + ["}"]) + "\n"


def _node_statement(node: dict) -> str:
    status = node["status"]
    shape = "x".join(map(str, node["shape"])) if node.get("shape") is not None else ""
    parts = (node["name"], short_target(node["target"]), f"{shape} {node.get('dtype') or ''}".strip())
    label = "\n".join(x for x in parts if x)
    style = "rounded,filled,dashed" if not node["in_after"] else "rounded,filled"
    tooltip = f"{status}: made by {node.get('pass') or '?'}"
    return (f"{_quote(node['name'])} [label={_quote(label)}, fillcolor={_quote(STATUS[status][0])}, "
            f"style={_quote(style)}, tooltip={_quote(tooltip)}];")


def _box_statement(path: str, inside: list[dict]) -> str:
    counts = Counter(n["status"] for n in inside)
    changes = [(s, c) for s, c in counts.most_common() if s != "unchanged"]
    colour = STATUS[changes[0][0] if changes else "unchanged"][0]
    label = "\n".join([path or "<root>", f"{len(inside)} nodes"] + [f"{c} {s}" for s, c in changes])
    return (f"{_quote('module:' + path)} [shape=box3d, label={_quote(label)}, fillcolor={_quote(colour)}, "
            "style=filled];")


def _clusters(members: dict[str, list[str]], path: str, indent: int) -> list[str]:
    pad = "  " * indent
    out = [pad + s for s in members.get(path, [])]
    prefix = f"{path}." if path else ""
    children = sorted({(prefix + p[len(prefix):].split(".")[0]) for p in members
                       if p.startswith(prefix) and p != path and p})
    for child in children:
        out.append(f"{pad}subgraph {_quote('cluster_' + child)} {{")
        out.append(f"{pad}  label={_quote(child.rpartition('.')[2])}; style=rounded; color=\"#b0b7c3\";")
        out += _clusters(members, child, indent + 1)
        out.append(f"{pad}}}")
    return out


def _edges(graph: GraphDiff, shown: list[dict], item_of: dict[str, str]) -> list[str]:
    seen: dict[tuple[str, str], bool] = {}
    for node in shown:
        now = node.get("inputs", []) if node["in_after"] else []
        then = graph.before_inputs.get(node["name"], [] if node["in_after"] else node.get("inputs", []))
        for source in list(now) + [i for i in then if i not in now]:
            a, b = item_of.get(source), item_of[node["name"]]
            if a is None or a == b:
                continue
            gone = source not in now
            seen[(a, b)] = seen.get((a, b), True) and gone
    return [f"  {_quote(a)} -> {_quote(b)}" + (" [style=dashed, color=\"#c0392b\"];" if gone else ";")
            for (a, b), gone in seen.items()]


def auto_depth(nodes: list[dict], limit: int = 150, params: bool = True) -> int | None:
    """The deepest module depth at which to_dot draws at most `limit` boxes (None: the whole graph fits)."""
    shown = [n["path"] for n in nodes if params or n["op"] != "get_attr"]
    if len(shown) <= limit:
        return None
    deepest = max((p.count(".") + 1 for p in shown if p), default=1)
    for depth in range(deepest, 0, -1):
        boxes = {_cut(p, depth) for p in shown if p and p.count(".") + 1 >= depth}
        if len(boxes) + sum(1 for p in shown if not p or p.count(".") + 1 < depth) <= limit:
            return depth
    return 1


def to_svg(dot: str, timeout: float = 300.0) -> str:
    """Render DOT text to SVG with Graphviz's `dot` binary (Debian package `graphviz`)."""
    binary = shutil.which("dot")
    if binary is None:
        raise SurgeonError("SVG needs Graphviz's `dot` program, which is not installed: install the Debian "
                           "package `graphviz` (apt-get install graphviz), or write DOT with --dot and render "
                           "it elsewhere")
    try:
        done = subprocess.run([binary, "-Tsvg"], input=dot, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise SurgeonError(f"Graphviz `dot` took over {timeout:.0f} s; render fewer nodes (--depth, --filter)") \
            from error
    if done.returncode != 0:
        raise SurgeonError(f"Graphviz `dot` failed (exit {done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def write_views(out_dir: str | Path, before_nodes: list[dict] | None, after_nodes: list[dict],
                report_dict: dict | None, title: str | None = None) -> list[Path]:
    """Write graph.html (the interactive before/after view) and graph.dot into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"surgeon: {(report_dict or {}).get('model', 'graph')}"
    html_path, dot_path = out / "graph.html", out / "graph.dot"
    write_text_nofollow(html_path, to_html(before_nodes, after_nodes, report_dict, title))
    write_text_nofollow(dot_path, to_dot(after_nodes, before=before_nodes, report=report_dict, title=title))
    return [html_path, dot_path]
