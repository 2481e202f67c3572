"""The HTML view's script, part 1: data, module tree, layout and drawing (part 2: script_ui.py).

Inlined into graph.html by surgeon.visualize.html; no library, no network.

Model: every node belongs to the block of its module path; an expanded block is a frame laid
out with its children (sub-blocks and its own nodes) in layers by data flow; a collapsed block
is one box. Layout is recomputed on expand/collapse (linear in the visible nodes and edges);
only the boxes, frames and edges inside the viewport are in the DOM (re-culled on scroll).
"""

CORE = r"""
const T0 = performance.now();
const D = JSON.parse(document.getElementById("surgeon-data").textContent);
const N = D.nodes, S = D.status, $ = (id) => document.getElementById(id);
const OWN_MAX = 16, NW = 176, NH = 34, BW = 214, BH = 46, GX = 16, GY = 30, PAD = 12, HEAD = 22, MARGIN = 400;
const st = {mode: D.has_before ? "diff" : "after", params: false, sel: null, open: new Set([""]), only: null};
const ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
const esc = (s) => String(s == null ? "" : s).replace(/[&<>"]/g, (c) => ENTITY[c]);
const short = (t) => t.replace(/^aten\./, "").replace(/\.default$/, "");
const shape = (n) => n.sh ? n.sh.join("x") + " " + (n.d || "") : "";
const isGone = (s) => s === "removed" || s.endsWith("-away");
const css = document.createElement("style");
css.textContent = Object.entries(S).map(([k, v]) => `.st-${k}{--c:${v[0]};--t:${v[0]}33}`).join("\n");
document.head.appendChild(css);

// ---------------------------------------------------------------- module tree
const blocks = new Map();
function block(path) {
  let b = blocks.get(path);
  if (b) return b;
  const cut = path.lastIndexOf(".");
  const parent = path === "" ? null : block(cut < 0 ? "" : path.slice(0, cut));
  b = {key: "b" + path, path, label: path === "" ? "<root>" : path.slice(cut + 1), parent, kids: [], own: [],
       first: Infinity, counts: {}, total: 0, isBlock: true};
  b.chain = parent ? parent.chain.concat([b]) : [b];
  if (parent) parent.kids.push(b);
  blocks.set(path, b);
  return b;
}
N.forEach((n, i) => { n.i = i; n.key = "n" + i; n.users = []; n.bp = n.p; block(n.p).own.push(n); });
// a module with sub-modules and many ops of its own (e.g. a model's mask arithmetic) keeps them in one box
for (const b of [...blocks.values()]) {
  if (!b.kids.length || b.own.filter((n) => n.o !== "get_attr").length <= OWN_MAX) continue;
  const ops = block((b.path ? b.path + "." : ".") + "(ops)");
  ops.label = `${b.own.length} ops of ${b.label}`;
  for (const n of b.own) n.bp = ops.path;
  ops.own = b.own; b.own = [];
}
N.forEach((n, i) => {
  if (n.o !== "get_attr") for (const a of blocks.get(n.bp).chain) a.first = Math.min(a.first, i);
});
// a block orders by its first op (parameters come first in an FX graph and would order it too early)
N.forEach((n, i) => { for (const a of blocks.get(n.bp).chain) if (a.first === Infinity) a.first = i; });
N.forEach((n) => { for (const j of new Set([...(n.ia || []), ...(n.ib || [])])) N[j].users.push(n.i); });
for (const b of blocks.values()) b.kids.sort((x, y) => x.first - y.first);
const root = blocks.get("");

// ---------------------------------------------------------------- what is visible
const inMode = (n) => st.mode === "diff" || (n.f & (st.mode === "after" ? 2 : 1)) !== 0;
const shown = (n) => inMode(n) && (st.params || n.o !== "get_attr");
function inputsOf(n) {
  if (st.mode === "before") return n.ib || n.ia || [];
  if (st.mode === "after") return n.ia || [];
  return n.ib && n.ia ? [...new Set([...n.ia, ...n.ib])] : (n.ia || n.ib || []);
}
function repOf(n) {
  for (const b of blocks.get(n.bp).chain) if (!st.open.has(b.path)) return b;
  return n;
}
const contOf = (r) => r.isBlock ? r.chain.slice(0, -1) : blocks.get(r.bp).chain;
const order = (u) => u.isBlock ? u.first : u.i;
let view = null;

function buildView() {
  const reps = new Array(N.length), items = new Map();
  for (const b of blocks.values()) { b.counts = {}; b.total = 0; }
  for (const n of N) {
    if (!inMode(n)) continue;
    for (const b of blocks.get(n.bp).chain) { b.counts[n.st] = (b.counts[n.st] || 0) + 1; b.total++; }
    if (!shown(n)) continue;
    const r = repOf(n); reps[n.i] = r; items.set(r.key, r);
  }
  const edges = new Map();
  for (const n of N) {
    const r = reps[n.i];
    if (!r) continue;
    for (const j of inputsOf(n)) {
      const q = reps[j];
      if (!q || q === r) continue;
      const k = q.key + ">" + r.key, gone = st.mode === "diff" && !(n.ia && n.ia.includes(j));
      const e = edges.get(k);
      if (e) e.gone = e.gone && gone; else edges.set(k, {a: q, b: r, gone});
    }
  }
  const {top, comps} = nest(items, edges);
  layout(top, true);
  place(top, 0, 0);
  view = {items: [...items.values()], edges: [...edges.values()], comps: [...comps.values()].filter((c) => c !== top),
          w: top.w, h: top.h};
}

// each expanded block is a frame holding its children; an edge lives in the innermost frame holding both ends
function nest(items, edges) {
  const comps = new Map();
  const comp = (b) => {
    let c = comps.get(b.path);
    if (!c) {
      c = {key: "f" + b.path, blk: b, kids: new Set(), edges: new Map(), isComp: true};
      comps.set(b.path, c);
    }
    return c;
  };
  for (const r of items.values()) {
    const cont = contOf(r);
    cont.forEach((b, d) => comp(b).kids.add(d + 1 < cont.length ? comp(cont[d + 1]) : r));
  }
  for (const e of edges.values()) {
    const ca = contOf(e.a), cb = contOf(e.b);
    let d = 0;
    while (d + 1 < ca.length && d + 1 < cb.length && ca[d + 1] === cb[d + 1]) d++;
    const u = d + 1 < ca.length ? comp(ca[d + 1]) : e.a, v = d + 1 < cb.length ? comp(cb[d + 1]) : e.b;
    comp(ca[d]).edges.set(u.key + ">" + v.key, [u, v]);
  }
  return {top: comp(root), comps};
}

// ---------------------------------------------------------------- layout: layers by data flow, nested frames
const uorder = (u) => order(u.isComp ? u.blk : u);
function layout(c, isRoot) {
  const units = [...c.kids].sort((x, y) => uorder(x) - uorder(y));
  const pos = new Map(units.map((u, k) => [u, k])), preds = new Map(units.map((u) => [u, []]));
  for (const u of units) {
    if (u.isComp) layout(u, false);
    else { u.w = u.isBlock ? BW : NW; u.h = u.isBlock ? BH : NH; }
  }
  const succs = new Map(units.map((u) => [u, []]));
  for (const [u, v] of c.edges.values()) if (pos.get(u) < pos.get(v)) { preds.get(v).push(u); succs.get(u).push(v); }
  const layer = new Map(), rows = [];
  for (const u of units) {
    let l = 0;
    for (const p of preds.get(u)) l = Math.max(l, layer.get(p) + 1);
    layer.set(u, l);
  }
  for (const u of units) {   // a source (input, parameter) sits just above its first reader
    const next = succs.get(u);
    if (!preds.get(u).length && next.length) {
      layer.set(u, Math.max(0, Math.min(...next.map((v) => layer.get(v))) - 1));
    }
    (rows[layer.get(u)] = rows[layer.get(u)] || []).push(u);
  }
  let y = (isRoot ? 0 : HEAD) + PAD, width = 0;
  for (const row of rows) {
    if (!row) continue;
    for (const u of row) {
      const ps = preds.get(u);
      u.bx = ps.length ? ps.reduce((s, p) => s + p.x + p.w / 2, 0) / ps.length : 0;
    }
    row.sort((a, b) => a.bx - b.bx || uorder(a) - uorder(b));
    let x = PAD, h = 0;
    for (const u of row) {
      u.x = Math.max(x, u.bx - u.w / 2); u.y = y;
      x = u.x + u.w + GX; h = Math.max(h, u.h);
    }
    width = Math.max(width, x - GX + PAD); y += h + GY;
  }
  c.w = Math.max(width, 170); c.h = Math.max(y - GY + PAD, HEAD + PAD);
  c.units = units;
}
function place(c, x, y) {
  c.ax = x; c.ay = y;
  for (const u of c.units) { if (u.isComp) place(u, x + u.x, y + u.y); else { u.ax = x + u.x; u.ay = y + u.y; } }
}

// ---------------------------------------------------------------- drawing (only what is in view)
const canvas = $("canvas"), plane = $("plane"), svg = $("edges");
let live = new Map(), pending = false;
function chips(counts) {
  return Object.keys(S).filter((k) => k !== "unchanged" && counts[k])
    .map((k) => `<i class="st-${k}" title="${k}">${counts[k]}</i>`).join("");
}
function dominant(counts) {
  let best = "unchanged";
  for (const k of Object.keys(S)) if (k !== "unchanged" && (counts[k] || 0) > (counts[best] || 0)) best = k;
  return best === "unchanged" || !counts[best] ? null : best;
}
function element(u) {
  const el = document.createElement("div");
  el.dataset.key = u.key;
  if (u.isComp) {
    const b = u.blk;
    el.className = "frame";
    el.innerHTML = `<div class="fh" data-key="${esc(u.key)}" title="collapse">&#9662; ${esc(b.path)} ` +
      `<small>${b.total} nodes</small></div>`;
  } else if (u.isBlock) {
    const dom = dominant(u.counts);
    el.className = "item block" + (dom ? " changed st-" + dom : "");
    el.title = u.path + " (click to expand)";
    el.innerHTML = `<b>&#9656; ${esc(u.label)} <small>${u.total}</small></b>` +
      `<div class="chips">${chips(u.counts)}</div>`;
  } else {
    el.className = `item node st-${u.st}` + (isGone(u.st) ? " gone" : "");
    el.title = `${u.n} (${u.st})`;
    el.innerHTML = `<b>${esc(u.n)}</b><span>${esc(short(u.t))} ${esc(shape(u))}</span>`;
  }
  if (st.sel && st.sel.key === u.key) el.classList.add("sel");
  const s = el.style;
  s.left = u.ax + "px"; s.top = u.ay + "px"; s.width = u.w + "px"; s.height = u.h + "px";
  return el;
}
function draw() {
  pending = false;
  const x0 = canvas.scrollLeft - MARGIN, y0 = canvas.scrollTop - MARGIN;
  const x1 = x0 + canvas.clientWidth + 2 * MARGIN, y1 = y0 + canvas.clientHeight + 2 * MARGIN;
  const hit = (u) => u.ax < x1 && u.ax + u.w > x0 && u.ay < y1 && u.ay + u.h > y0;
  const next = new Map();
  for (const u of view.comps.concat(view.items)) {
    if (!hit(u)) continue;
    let el = live.get(u.key);
    if (!el) { el = element(u); plane.appendChild(el); }
    next.set(u.key, el); live.delete(u.key);
  }
  for (const el of live.values()) el.remove();
  live = next;
  const kept = [], gone = [];
  for (const e of view.edges) {
    const ax = e.a.ax + e.a.w / 2, ay = e.a.ay + e.a.h, bx = e.b.ax + e.b.w / 2, by = e.b.ay;
    if (Math.max(ax, bx) < x0 || Math.min(ax, bx) > x1 || Math.max(ay, by) < y0 || Math.min(ay, by) > y1) continue;
    const dy = Math.max(20, Math.abs(by - ay) / 2);
    (e.gone ? gone : kept).push(`M${ax} ${ay}C${ax} ${ay + dy} ${bx} ${by - dy} ${bx} ${by}`);
  }
  $("e-kept").setAttribute("d", kept.join(""));
  $("e-gone").setAttribute("d", gone.join(""));
}
const schedule = () => { if (!pending) { pending = true; requestAnimationFrame(draw); } };
function render() {
  buildView();
  plane.style.width = view.w + "px"; plane.style.height = view.h + "px";
  svg.setAttribute("width", view.w); svg.setAttribute("height", view.h);
  for (const el of live.values()) el.remove();
  live = new Map();
  draw();
}
canvas.addEventListener("scroll", schedule);
window.addEventListener("resize", schedule);

"""
