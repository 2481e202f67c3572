"""The HTML view of a compile: one self-contained file (data, CSS and JS inline; no network).

The page shows the module hierarchy as nested blocks (collapsed beyond ~60 items at first,
expanded or collapsed by a click), each node coloured by its status (surgeon.visualize.diff),
a Before / After / Diff switch (Diff overlays removed nodes, dashed, on the after graph), node
details on click, a search by node name or module path, the list of changed nodes and the
report's pass table. Long lists and the canvas are virtualized (only what is in view is in the
DOM), so a 32-layer LLaMA graph with thousands of nodes stays responsive.

Guarantees: the output references no URL (no script, style, font or image is fetched); the
embedded JSON cannot close its <script> element (every <, > and & in it is \\u-escaped).
"""
from __future__ import annotations

import html
import json

from .diff import STATUS, diff
from .script import CORE
from .script_ui import UI

SCRIPT = '"use strict";\n(function () {\n' + CORE + UI + "})();\n"

STYLE = """
*{box-sizing:border-box}
body{margin:0;font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;display:flex;
 flex-direction:column;height:100vh}
header{display:flex;gap:8px;align-items:center;padding:6px 10px;border-bottom:1px solid #ccd2dc;
 background:#f5f6f8;flex-wrap:wrap}
header h1{font-size:15px;margin:0 6px 0 0}
header .sum{color:#556;font-size:12px}
button{font:inherit;font-size:12px;padding:2px 9px;border:1px solid #aab;border-radius:4px;background:#fff;
 cursor:pointer}
button.on{background:#1a56db;border-color:#1a56db;color:#fff}
input[type=search]{font:inherit;padding:2px 6px;width:220px}
#main{flex:1;display:flex;min-height:0}
#canvas{flex:1;overflow:auto;position:relative;background:#fbfbfc}
#plane{position:relative}
#edges{position:absolute;left:0;top:0;pointer-events:none;overflow:visible}
#edges path{fill:none;stroke:#8b93a1;stroke-width:1.1}
#edges path.gone{stroke:#c0392b;stroke-dasharray:4 3}
.item{position:absolute;border-radius:6px;padding:2px 6px;overflow:hidden;white-space:nowrap;cursor:pointer;
 font-size:11px}
.item b,.item span{display:block;overflow:hidden;text-overflow:ellipsis}
.item span{color:#4a5160}
.node{background:var(--t);border:1px solid var(--c);border-left:6px solid var(--c)}
.node.st-unchanged{background:#fff;border-color:#c3c9d3}
.node.gone{border-style:dashed}
.node.gone b{text-decoration:line-through}
.block{background:#eef1f6;border:1px solid #98a2b3;box-shadow:2px 2px 0 #c9cfd9}
.block.changed{border-color:var(--c);border-width:2px}
.frame{position:absolute;border:1px solid #b4bcc8;border-radius:8px;background:rgba(110,130,170,.045)}
.frame .fh{font-size:11px;color:#3c4452;padding:3px 8px;cursor:pointer;white-space:nowrap;overflow:hidden;
 text-overflow:ellipsis}
.chips i{font-style:normal;display:inline-block;min-width:16px;padding:0 4px;margin:1px 3px 0 0;
 border-radius:7px;font-size:10px;color:#fff;text-align:center;background:var(--c)}
.sel{outline:3px solid #1a56db;outline-offset:1px}
aside{width:380px;border-left:1px solid #ccd2dc;overflow:auto;padding:6px 10px;background:#fff}
aside h2{font-size:13px;margin:10px 0 4px}
.vlist{position:relative;height:160px;overflow:auto;border:1px solid #dde1e8;border-radius:4px}
.vlist .row{position:absolute;left:0;right:0;height:20px;padding:1px 6px;white-space:nowrap;overflow:hidden;
 text-overflow:ellipsis;cursor:pointer}
.vlist .row:hover{background:#eef3ff}
.vlist .row small,.muted{color:#778}
.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:5px;vertical-align:-1px;
 background:var(--c)}
#legend span{display:inline-block;margin:0 8px 2px 0;cursor:pointer;white-space:nowrap}
#legend span.off{opacity:.35}
#details table,#report table{border-collapse:collapse;width:100%;font-size:12px}
#details td,#report td,#report th{padding:1px 4px;vertical-align:top;border-bottom:1px solid #eceef2;
 text-align:left}
#details td:first-child{color:#667;width:78px}
a[data-reveal]{color:#1a56db;cursor:pointer;text-decoration:underline}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>{style}</style></head>
<body>
<header><h1>{title}</h1><span class="sum" id="summary"></span>
<span id="modes"></span>
<button id="expand-all">expand all</button><button id="collapse-all">collapse all</button>
<label><input type="checkbox" id="params"> parameters</label>
<input type="search" id="search" placeholder="search node or module (Enter)" autocomplete="off"></header>
<div id="main"><div id="canvas"><div id="plane"><svg id="edges"><path id="e-kept"></path>
<path id="e-gone" class="gone"></path></svg></div></div>
<aside><div id="legend"></div>
<h2>search <small class="muted" id="result-count"></small></h2><div class="vlist" id="results"></div>
<h2>details</h2><div id="details" class="muted">click a node or a block</div>
<h2>changed nodes <small class="muted" id="change-count"></small></h2><div class="vlist" id="changes"></div>
<h2>report</h2><div id="report"></div></aside></div>
<script type="application/json" id="surgeon-data">{data}</script>
<script>{script}</script>
</body></html>
"""


def _inputs(names: list[str], index: dict[str, int]) -> list[int]:
    return [index[n] for n in names if n in index]


def payload(before_nodes: list[dict] | None, after_nodes: list[dict], report: dict | None, title: str) -> dict:
    """The page's data: union nodes with status and input indices, the status table, the report."""
    graph = diff(before_nodes, after_nodes, report)
    index = {n["name"]: i for i, n in enumerate(graph.nodes)}
    before = {n["name"]: n for n in before_nodes or []}
    rows = []
    for node in graph.nodes:
        name = node["name"]
        row = {"n": name, "o": node["op"], "t": node["target"], "p": node["path"], "s": node.get("pass") or "",
               "a": node.get("adapter"), "sh": node.get("shape"), "d": node.get("dtype"), "st": node["status"],
               "f": (1 if node["in_before"] else 0) | (2 if node["in_after"] else 0)}
        row["ia"] = _inputs(node.get("inputs", []), index) if node["in_after"] else None
        if not node["in_after"]:
            row["ib"] = _inputs(node.get("inputs", []), index)
        elif name in graph.before_inputs:
            row["ib"] = _inputs(graph.before_inputs[name], index)
        fields = [f for f in graph.changed.get(name, []) if f not in ("inputs", "weight")]
        if fields and name in before:
            row["bv"] = {f: before[name].get(f) for f in fields}
        if name in graph.changed:
            row["ch"] = graph.changed[name]
        rows.append(row)
    passes = [{"name": p["name"], "matches": p.get("matches"), "nodes": p.get("nodes"), "check": p.get("check"),
               "seconds": p.get("seconds"), "rejected": len(p.get("rejections") or [])}
              for p in (report or {}).get("passes", [])]
    return {"title": title, "has_before": before_nodes is not None, "nodes": rows,
            "status": {k: list(v) for k, v in STATUS.items()},
            "summary": {"added": len(graph.added), "removed": len(graph.removed), "changed": len(graph.changed),
                        "before": sum(1 for n in graph.nodes if n["in_before"]),
                        "after": sum(1 for n in graph.nodes if n["in_after"])},
            "report": {"model": (report or {}).get("model"), "passes": passes,
                       "adapters": (report or {}).get("adapters", [])}}


def embed_json(data: dict) -> str:
    """JSON safe inside a <script> element: no character of it can end the element."""
    text = json.dumps(data, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_html(before_nodes: list[dict] | None, after_nodes: list[dict], report_dict: dict | None = None,
            title: str = "surgeon graph") -> str:
    """One self-contained HTML page showing the graph, what each pass did to it, and the diff."""
    data = payload(before_nodes, after_nodes, report_dict, title)
    return PAGE.format(title=html.escape(title), style=STYLE, data=embed_json(data), script=SCRIPT)
