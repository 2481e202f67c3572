"""The HTML view's script, part 2: clicks, details, search, virtual lists, header and start-up.

Runs in the same closure as part 1 (surgeon/visualize/script.py: `N`, `blocks`, `view`, `render` ...);
surgeon.visualize.html joins the two. On start it opens whole levels of modules while the view
has at most ~64 boxes, draws, and sets `document.body.dataset.ready = "1"`; `window.surgeonView`
exposes reveal(name), stats(), setMode(mode) and expandAll() for scripts and tests.
"""

UI = r"""
// ---------------------------------------------------------------- interaction
function scrollTo(u) {
  canvas.scrollLeft = u.ax + u.w / 2 - canvas.clientWidth / 2;
  canvas.scrollTop = u.ay - canvas.clientHeight / 3;
  draw();
}
function select(u) {
  if (st.sel) { const old = live.get(st.sel.key); if (old) old.classList.remove("sel"); }
  st.sel = u;
  const el = u && live.get(u.key);
  if (el) el.classList.add("sel");
  $("details").className = "";
  $("details").innerHTML = u.isBlock ? blockDetails(u) : nodeDetails(u);
}
const link = (i) => `<a data-reveal="${i}">${esc(N[i].n)}</a>`;
function nodeDetails(n) {
  const status = `<span class="dot st-${n.st}"></span>${esc(n.st)} <span class="muted">${esc(S[n.st][1])}</span>`;
  const rows = [["status", status],
    ["op", esc(n.o)], ["target", esc(n.t)], ["module", esc(n.p || "<root>")], ["made by", esc(n.s)],
    ["adapter", esc(n.a || "")], ["shape", esc(n.sh ? "[" + n.sh.join(", ") + "]" : "")], ["dtype", esc(n.d || "")]];
  if (n.ch) rows.push(["changed", esc(n.ch.join(", "))]);
  for (const [f, v] of Object.entries(n.bv || {})) rows.push(["was " + esc(f), esc(JSON.stringify(v))]);
  const ins = inputsOf(n);
  const params = ins.filter((j) => N[j].o === "get_attr");
  rows.push(["inputs", ins.filter((j) => N[j].o !== "get_attr").map(link).join(", ")]);
  const param = (j) => `${link(j)} <span class="muted">${esc(N[j].t)} ${esc(shape(N[j]))}</span>`;
  rows.push(["parameters", params.map(param).join("<br>")]);
  rows.push(["users", n.users.filter((j) => inMode(N[j])).map(link).join(", ")]);
  return `<b>${esc(n.n)}</b><table>` + rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("") +
    "</table>";
}
function blockDetails(b) {
  const counts = Object.entries(b.counts).map(([k, c]) => `<span class="dot st-${k}"></span>${c} ${esc(k)}`)
    .join("<br>");
  return `<b>${esc(b.path || "<root>")}</b><table><tr><td>nodes</td><td>${b.total}</td></tr>` +
    `<tr><td>sub-modules</td><td>${b.kids.length}</td></tr><tr><td>statuses</td><td>${counts}</td></tr></table>`;
}
function toggle(path, open) {
  if (open) st.open.add(path); else st.open.delete(path);
  render();
  const b = blocks.get(path), u = open ? view.comps.find((c) => c.blk === b) : view.items.find((x) => x === b);
  if (u) scrollTo(u);
  select(b);
}
function reveal(i) {
  const n = N[i];
  if (!inMode(n)) setMode("diff", false);
  if (n.o === "get_attr" && !st.params) { st.params = true; $("params").checked = true; }
  for (const b of blocks.get(n.bp).chain) st.open.add(b.path);
  render();
  scrollTo(n);
  select(n);
}
plane.addEventListener("click", (ev) => {
  const el = ev.target.closest("[data-key]");
  if (!el) return;
  const key = el.dataset.key;
  if (key[0] === "n") select(N[+key.slice(1)]);
  else if (key[0] === "b") toggle(key.slice(1), true);
  else if (key[0] === "f" && ev.target.closest(".fh")) toggle(key.slice(1), false);
});
$("details").addEventListener("click", (ev) => {
  const a = ev.target.closest("[data-reveal]");
  if (a) reveal(+a.dataset.reveal);
});

// ---------------------------------------------------------------- virtual lists: search results, changes
function vlist(el, row) {
  const inner = document.createElement("div");
  el.appendChild(inner);
  let data = [];
  const paint = () => {
    const a = Math.max(0, Math.floor(el.scrollTop / 20) - 5);
    const b = Math.min(data.length, Math.ceil((el.scrollTop + el.clientHeight) / 20) + 5);
    let html = "";
    for (let k = a; k < b; k++) {
      html += `<div class="row" data-i="${data[k]}" style="top:${k * 20}px">${row(N[data[k]])}</div>`;
    }
    inner.style.height = data.length * 20 + "px";
    inner.innerHTML = html;
  };
  el.addEventListener("scroll", () => requestAnimationFrame(paint));
  el.addEventListener("click", (ev) => { const r = ev.target.closest(".row"); if (r) reveal(+r.dataset.i); });
  return {set(d) { data = d; el.scrollTop = 0; paint(); }, get data() { return data; }};
}
const rowHtml = (n) => `<span class="dot st-${n.st}"></span>${esc(n.n)} <small>${esc(n.p || "<root>")}</small>`;
const results = vlist($("results"), rowHtml), changes = vlist($("changes"), rowHtml);
let timer = 0;
function search(q) {
  q = q.trim().toLowerCase();
  $("results").style.display = q ? "" : "none";
  if (!q) { results.set([]); $("result-count").textContent = ""; return; }
  const byName = [], byPath = [];
  for (const n of N) {
    if (n.n.toLowerCase().includes(q)) byName.push(n.i);
    else if (n.p.toLowerCase().includes(q) || n.t.toLowerCase().includes(q)) byPath.push(n.i);
  }
  byName.sort((a, b) => (N[b].n.toLowerCase() === q) - (N[a].n.toLowerCase() === q) || a - b);
  results.set(byName.concat(byPath));
  $("result-count").textContent = `${byName.length + byPath.length} found`;
}
$("search").addEventListener("input", (ev) => {
  clearTimeout(timer);
  timer = setTimeout(() => search(ev.target.value), 120);
});
$("search").addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter") return;
  search(ev.target.value);
  if (results.data.length) reveal(results.data[0]);
});
function listChanges() {
  const list = N.filter((n) => n.st !== "unchanged" && (!st.only || n.st === st.only)).map((n) => n.i);
  changes.set(list);
  $("change-count").textContent = `${list.length}`;
}

// ---------------------------------------------------------------- header, legend, report, start
function setMode(mode, draw) {
  st.mode = mode;
  for (const b of document.querySelectorAll("#modes button")) b.classList.toggle("on", b.dataset.mode === mode);
  if (draw !== false) render();
}
if (D.has_before) {
  $("modes").innerHTML = ["diff", "before", "after"].map((m) => `<button data-mode="${m}">${m}</button>`).join("");
  $("modes").addEventListener("click", (ev) => {
    const b = ev.target.closest("button");
    if (b) setMode(b.dataset.mode);
  });
  setMode(st.mode, false);
}
const sm = D.summary;
$("summary").textContent = D.has_before
  ? `${sm.before} -> ${sm.after} nodes: ${sm.added} added, ${sm.removed} removed, ${sm.changed} changed`
  : `${sm.after} nodes`;
const totals = {};
for (const n of N) totals[n.st] = (totals[n.st] || 0) + 1;
$("legend").innerHTML = Object.keys(S).filter((k) => totals[k])
  .map((k) => `<span data-st="${k}" title="${esc(S[k][1])}"><span class="dot st-${k}"></span>${k} ${totals[k]}</span>`)
  .join("");
$("legend").addEventListener("click", (ev) => {
  const s = ev.target.closest("[data-st]");
  if (!s || s.dataset.st === "unchanged") return;
  st.only = st.only === s.dataset.st ? null : s.dataset.st;
  for (const e of $("legend").children) e.classList.toggle("off", !!st.only && e.dataset.st !== st.only);
  listChanges();
});
const R = D.report, cell = (v) => `<td>${esc(v)}</td>`;
const passRow = (p) => "<tr>" + [p.name, p.matches, (p.nodes || []).join(" -> "), p.check,
  p.seconds == null ? "" : (p.seconds * 1000).toFixed(0)].map(cell).join("") + "</tr>";
$("report").innerHTML = (R.passes.length ? "<table><tr><th>pass</th><th>matches</th><th>ops</th><th>check</th>" +
  "<th>ms</th></tr>" + R.passes.map(passRow).join("") + "</table>" : "<span class='muted'>no report</span>") +
  R.adapters.map((a) => `<div>adapter <b>${esc(a.name)}</b> (${esc(a.type)}): ${esc(a.status)}, ` +
                        `${a.modules.length} modules</div>`).join("");
$("params").addEventListener("change", (ev) => { st.params = ev.target.checked; render(); });
$("expand-all").addEventListener("click", () => { for (const p of blocks.keys()) st.open.add(p); render(); });
$("collapse-all").addEventListener("click", () => { st.open = new Set([""]); render(); });
function openFirstLevels(limit) {   // open whole levels of modules while the view stays small, then leaves
  const more = (b) => b.kids.length + b.own.filter(shown).length - 1;
  let count = root.kids.length + root.own.filter(shown).length, level = [root];
  while (level.length) {
    const next = level.flatMap((b) => b.kids.filter((k) => k.kids.length));
    const cost = next.reduce((s, b) => s + more(b), 0);
    if (!next.length || count + cost > limit) break;
    for (const b of next) st.open.add(b.path);
    count += cost; level = next;
  }
  for (const b of [...blocks.values()].sort((x, y) => x.chain.length - y.chain.length)) {
    if (b.kids.length || !b.parent || !st.open.has(b.parent.path) || count + more(b) > limit) continue;
    st.open.add(b.path); count += more(b);
  }
}
openFirstLevels(64);
search("");
render();
listChanges();
window.surgeonView = {
  reveal: (name) => { const n = N.find((x) => x.n === name); if (n) reveal(n.i); return !!n; },
  stats: () => ({nodes: N.length, items: view.items.length, rendered: live.size, frames: view.comps.length,
                 edges: view.edges.length, mode: st.mode, ms: T1 - T0}),
  setMode, expandAll: () => $("expand-all").click(),
};
const T1 = performance.now();
document.body.dataset.ready = "1";
"""
