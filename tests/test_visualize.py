"""Graph views: the before/after diff of a LoRA insert + merge, DOT structure, self-contained HTML, CLI."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from functools import lru_cache

import pytest

import surgeon
from surgeon import cli
from surgeon.cli import views as cli_views
from surgeon.compiled import node_table
from surgeon.errors import SurgeonError
from surgeon.visualize import auto_depth, diff, pass_kind, to_dot, to_html, to_svg, write_views
from tests.conftest import hf_llama, lora_spec

KW = {"use_cache": False}
SITES = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


@lru_cache(maxsize=None)
def llama_tables() -> dict:
    """Node tables of hf_llama (2 layers): captured, after LoRA insert, after merge; and the report."""
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.v_proj"]), KW)
    captured = compiled.nodes_before     # the compile's own capture (with the optional inputs it added)
    inserted = node_table(compiled.module)
    inserted_report = compiled.report.to_dict()
    compiled.apply(["merge"])
    report = json.loads(json.dumps(compiled.report.to_dict(), default=str))    # as report.json holds it
    return {"captured": captured, "inserted": inserted, "merged": node_table(compiled.module),
            "inserted_report": inserted_report, "report": report, "compiled": compiled}


def test_insert_adds_exactly_the_adapter_nodes_and_rewires_their_users():
    t = llama_tables()
    d = diff(t["captured"], t["inserted"], t["inserted_report"])
    adapter_nodes = {n["name"] for n in t["inserted"] if n["adapter"] == "chat"}
    assert set(d.added) == adapter_nodes and len(adapter_nodes) == 4 * 5   # A, B, 2 matmuls, add per site
    assert d.removed == []
    assert {d.status[n] for n in d.added} == {"inserted"}
    rewired = {name for name, fields in d.changed.items() if fields == ["inputs"]}
    assert rewired == set(d.changed) and len(rewired) == 4      # each site's old output users: one per site
    assert {n["path"] for n in d.nodes if n["name"] in rewired} == {p.rpartition(".")[0] for p in SITES}
    assert {p for p in d.by_path() if d.by_path()[p]["inserted"]} == {f"{s}.adapter_chat" for s in SITES} | SITES


def test_merge_after_insert_marks_adapter_nodes_merged_away():
    t = llama_tables()
    d = diff(t["inserted"], t["merged"], t["report"], t["inserted_report"])
    assert set(d.removed) == {n["name"] for n in t["inserted"] if n["adapter"] == "chat"}
    assert {d.status[n] for n in d.removed} == {"merged-away"}
    assert d.added == []
    merged = {n for n, s in d.status.items() if s == "merged"}
    assert {d.status[n] for n in d.changed} == {"rewired", "merged"}
    assert len(merged) == 8    # each site's linear and its weight


def test_insert_then_merge_leaves_same_ops_with_rewritten_weights():
    t = llama_tables()
    d = diff(t["captured"], t["merged"], t["report"])
    assert d.added == [] and d.removed == []
    by_name = {n["name"]: n for n in t["merged"]}
    merged = {n for n, s in d.status.items() if s == "merged"}
    assert set(d.changed) == merged
    assert {(by_name[n]["path"], by_name[n]["op"]) for n in merged} == \
        {(p, op) for p in SITES for op in ("call_function", "get_attr")}
    assert all(by_name[n]["target"].endswith((".weight", "linear.default")) for n in merged)
    n = len(t["captured"])
    assert d.summary().splitlines()[0] == f"{n} -> {n} nodes: 0 added, 0 removed, 8 changed"
    assert diff(t["captured"], t["captured"]).changed == {}


def _rec(name, op="call_function", target="aten.relu.default", path="m", made_by="capture", inputs=(), adapter=None):
    return {"name": name, "op": op, "target": target, "path": path, "pass": made_by, "adapter": adapter,
            "shape": [2], "dtype": "float32", "inputs": list(inputs)}


@pytest.mark.parametrize("record,kind", [
    (_rec("a"), "unchanged"), (_rec("a", made_by="insert", adapter="x"), "inserted"),
    (_rec("a", made_by="fold-bn"), "folded"), (_rec("a", made_by="co-permute"), "permuted"),
    (_rec("a", made_by="lower"), "fused"), (_rec("a", target="surgeon.lora_linear.default"), "fused"),
    (_rec("a", made_by="merge"), "merged"), (_rec("a", made_by="something-new"), "added"),
])
def test_pass_kind_table(record, kind):
    assert pass_kind(record) == kind


def test_removed_nodes_take_the_kind_of_their_replacement():
    before = [_rec("x", "placeholder", "x", ""), _rec("conv", target="aten.conv2d.default", inputs=["x"]),
              _rec("bn", target="aten.batch_norm.default", inputs=["conv"]), _rec("relu", inputs=["bn"]),
              _rec("mm", target="aten.mm.default", inputs=["relu"]), _rec("out", "output", "output", "", inputs=["mm"])]
    after = [before[0], _rec("conv_1", target="aten.conv2d.default", made_by="fold-bn", inputs=["x"]),
             _rec("relu", inputs=["conv_1"]), _rec("k", target="surgeon.lora_linear.default", made_by="lower",
                                                   inputs=["relu"]), _rec("out", "output", "output", "", inputs=["k"])]
    d = diff(before, after)
    assert d.status == {"x": "unchanged", "conv_1": "folded", "conv": "folded-away", "bn": "folded-away",
                        "relu": "rewired", "k": "fused", "mm": "fused-away", "out": "rewired"}
    order = [n["name"] for n in d.nodes]
    assert order.index("bn") < order.index("relu") and order.index("mm") < order.index("out")


def test_dot_has_a_nested_cluster_per_module_and_colours_by_status():
    t = llama_tables()
    dot = to_dot(t["inserted"], before=t["captured"], report=t["inserted_report"])
    assert dot.startswith("digraph surgeon {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    clusters = re.findall(r'subgraph "cluster_([^"]+)"', dot)
    paths = {n["path"] for n in t["inserted"] if n["path"]}
    assert set(clusters) == {".".join(p.split(".")[:k]) for p in paths for k in range(1, p.count(".") + 2)}
    q = dot.index('subgraph "cluster_model.layers.0.self_attn.q_proj.adapter_chat"')
    assert dot.rfind('subgraph "cluster_model.layers.0.self_attn.q_proj"', 0, q) > \
        dot.rfind('subgraph "cluster_model.layers.0.self_attn"', 0, q) > 0
    for node in t["inserted"]:
        assert len(re.findall(rf'^\s*"{node["name"]}" \[', dot, re.M)) == 1, node["name"]
    lora_a = next(n["name"] for n in t["inserted"] if n["target"].endswith("lora_A"))
    assert re.search(rf'"{lora_a}" \[.*fillcolor="#39a85a"', dot)
    collapsed = to_dot(t["inserted"], before=t["captured"], depth=3)
    assert '"module:model.layers.0" [shape=box3d' in collapsed and "cluster_model.layers.0" not in collapsed
    assert "10 inserted" in collapsed
    with pytest.raises(SurgeonError, match="at least 1"):
        to_dot(t["inserted"], depth=0)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` not installed (apt-get install graphviz)")
def test_svg_renders_through_graphviz(tmp_path, capsys):
    t = llama_tables()
    svg = to_svg(to_dot(t["inserted"], before=t["captured"], depth=5))
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    assert "<title>cluster_model.layers.0.self_attn</title>" in svg and ">model.layers.0.self_attn.q_proj<" in svg
    (tmp_path / "nodes.json").write_text(json.dumps(t["inserted"]))
    assert cli_runner()(["show", str(tmp_path), "--svg", str(tmp_path / "g.svg")]) == 0
    assert f"{auto_depth(t['inserted'])} levels down" in capsys.readouterr().out
    assert "</svg>" in (tmp_path / "g.svg").read_text()


def test_auto_depth_is_the_deepest_that_fits():
    nodes = llama_tables()["inserted"]
    boxes = lambda depth: len(re.findall(r'^\s*"[^"]+" \[', to_dot(nodes, depth=depth), re.M))  # noqa: E731
    depth = auto_depth(nodes, limit=40)
    assert boxes(depth) <= 40 < boxes(depth + 1)
    assert auto_depth(nodes, limit=len(nodes)) is None


def test_svg_without_graphviz_names_the_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SurgeonError, match="Debian package `graphviz`"):
        to_svg("digraph { a }")


def test_html_is_self_contained_and_cannot_be_broken_out_of():
    t = llama_tables()
    page = to_html(t["captured"], t["merged"], t["report"], "LoRA <merged>")
    assert not re.search(r"https?://", page) and "url(" not in page and "@import" not in page
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "LoRA &lt;merged&gt;" in page
    evil = [_rec("x</script><script>alert(1)</script>", "placeholder", "x", "")]
    page = to_html(None, evil, None, "t")
    assert page.count("</script>") == 2 and "alert(1)" in page
    data = json.loads(re.search(r'id="surgeon-data">(.*?)</script>', page, re.S).group(1))
    assert data["nodes"][0]["n"] == evil[0]["name"]


def cli_runner():
    """surgeon's `show` and `diff` commands as cli.main registers them (show's own options + cli_views)."""
    parser = argparse.ArgumentParser(prog="surgeon")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show")
    show.add_argument("dir")
    show.add_argument("--filter", default="*")
    show.set_defaults(fn=cli.cmd_show)
    cli_views.add_view_options(show)
    cli_views.add_diff_command(sub)
    return lambda argv: (lambda ns: ns.fn(ns))(parser.parse_args(argv))


def test_write_views_and_cli(tmp_path, capsys):
    t = llama_tables()
    out = t["compiled"].save(tmp_path / "run")
    (out / "nodes_before.json").write_text(json.dumps(t["captured"]))
    html, dot = write_views(out, t["captured"], t["merged"], t["report"])
    assert html.read_text().startswith("<!doctype html>") and dot.read_text().startswith("digraph")
    run = cli_runner()
    assert run(["show", str(out), "--html", str(tmp_path / "v.html"), "--dot", str(tmp_path / "v.dot"),
                "--filter", "model.layers.1*"]) == 0
    dot_text = (tmp_path / "v.dot").read_text()
    assert "cluster_model.layers.1" in dot_text and "cluster_model.layers.0" not in dot_text
    assert 'id="surgeon-data"' in (tmp_path / "v.html").read_text()
    capsys.readouterr()
    assert run(["diff", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 added, 0 removed, 8 changed" in text and "model.layers.1.self_attn.v_proj" in text
    assert run(["diff", str(out / "nodes.json"), str(out), "--depth", "3", "--nodes"]) == 0
    assert "no differences" in capsys.readouterr().out    # same report on both sides: no weight moved
    assert run(["show", str(out)]) == 0 and "made by" in capsys.readouterr().out
    with pytest.raises(SurgeonError, match="no nodes_before.json"):
        run(["diff", str(out / "nodes.json")])
