"""The HTML view in a real headless Chromium, driven over the DevTools protocol (websocket-client).

Checks what a person would: the page loads with no console error, nodes render in their diff
colours, a click shows a node's details, search finds a node, and a 32-layer LLaMA-style graph
(thousands of nodes) opens. With SURGEON_SCREENSHOT=1 it rewrites docs/graph_view.png (the README's picture).
Needs Debian's `chromium` (/usr/bin/chromium) and the `websocket-client` package; skips without.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
websocket = pytest.importorskip("websocket", reason="the browser test needs the websocket-client package")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not found: apt-get install chromium to run the browser test")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1400,900"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


class Browser:
    """One headless Chromium page: evaluate JS, click, type, screenshot; console errors collected."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not open its DevTools port (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids, self.errors, self.requests = itertools.count(1), [], []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(params["entry"]["text"])
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, seconds: float = 30.0):
        deadline = time.monotonic() + seconds
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def open(self, url: str) -> float:
        """Navigate and wait for the view to say it is ready; return the seconds it took."""
        start = time.perf_counter()
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.body.dataset.ready === '1'")
        return time.perf_counter() - start

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the first element matching `selector`."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      " e.scrollIntoView({block: 'nearest', inline: 'nearest'}); const r = e.getBoundingClientRect();"
                      " return [r.left + Math.min(r.width / 2, 40), r.top + Math.min(r.height / 2, 10)]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def two_adapter_page(folder: Path) -> tuple[Path, list[dict]]:
    """hf_llama with LoRA 'chat' inserted (q, v) and LoRA 'style' inserted then merged (o_proj)."""
    import surgeon
    from surgeon.compiled import node_table
    from surgeon.visualize import write_views
    from tests.conftest import hf_llama

    model, args = hf_llama()
    before = node_table(surgeon.capture(model, args, {"use_cache": False}))
    spec = {"adapters": [{"name": "chat", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4},
                         {"name": "style", "type": "lora", "targets": ["*.o_proj"], "rank": 2}],
            "pipeline": ["insert", {"merge": {"adapters": ["style"]}}]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False})
    report = json.loads(json.dumps(compiled.report.to_dict(), default=str))
    after = node_table(compiled.module)
    return write_views(folder, before, after, report)[0], after


def _rgb(colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(colour[k:k + 2], 16) for k in (1, 3, 5)))


def _node(nodes: list[dict], path: str, target: str) -> dict:
    return next(n for n in nodes if n["path"] == path and n["target"] == target)


def test_page_renders_diff_details_and_search(browser, tmp_path_factory):
    page, after = two_adapter_page(tmp_path_factory.mktemp("two-adapters"))
    o_proj = _node(after, "model.layers.0.self_attn.o_proj", "aten.linear.default")
    browser.errors.clear()
    browser.requests.clear()
    browser.open(page.as_uri())
    assert browser.requests == [page.as_uri()]                # nothing else is fetched
    assert browser.js("document.querySelectorAll('#plane .node').length") > 3
    browser.click("#collapse-all")                       # the model is one block, its chips count the diff
    for status, colour in (("inserted", "#39a85a"), ("merged", "#e0912b"), ("rewired", "#a9b53a")):
        chip = f"document.querySelector(\"#plane [data-key='bmodel'] .chips .st-{status}\")"
        assert browser.js(f"getComputedStyle({chip}).backgroundColor") == _rgb(colour), status
    assert browser.js("document.querySelector(\"#plane [data-key='bmodel'] .chips .st-inserted\").textContent") == "20"
    browser.type("#search", o_proj["inputs"][0])          # the op feeding o_proj: o_proj comes into view
    browser.wait("document.querySelector('#plane .node.sel') !== null")
    assert browser.js("document.querySelector('#plane .sel b').textContent") == o_proj["inputs"][0]
    assert browser.js("document.querySelectorAll('#results .row').length") >= 1
    browser.click("#plane .block[data-key='bmodel.layers.0.self_attn.o_proj']")    # a click expands a block
    browser.click("#plane .node.st-merged")
    colour = browser.js("getComputedStyle(document.querySelector('#plane .node.st-merged')).borderLeftColor")
    assert colour == _rgb("#e0912b")
    details = browser.js("document.getElementById('details').innerText")
    assert o_proj["name"] in details and "aten.linear.default" in details and "made by" in details
    assert "merged" in details and "model.layers.0.self_attn.o_proj" in details and "weight" in details
    lora_b = "model_layers_1_self_attn_v_proj_adapter_chat_lora_b"      # a parameter node: shown on demand
    browser.js("document.getElementById('search').value = ''")
    browser.type("#search", lora_b)
    browser.wait(f"(document.querySelector('#plane .sel b') || {{}}).textContent === '{lora_b}'")
    assert "adapter_chat.lora_B" in browser.js("document.getElementById('details').innerText")
    browser.click("#modes button[data-mode=before]")
    assert browser.js("document.querySelectorAll('#plane .st-inserted').length") == 0
    browser.click("#modes button[data-mode=diff]")
    browser.click("#params")
    browser.js("window.surgeonView.reveal(" + json.dumps(_node(after, "model.layers.0.self_attn.q_proj",
                                                               "aten.add.Tensor")["name"]) + ")")
    # the README's picture is refreshed only on request: SURGEON_SCREENSHOT=1 pytest tests/test_html_browser.py
    shot = DOCS / "graph_view.png" if os.environ.get("SURGEON_SCREENSHOT") else tmp_path_factory.mktemp("shot") / "v.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 10_000
    assert browser.errors == []


def llama32_page(folder: Path) -> Path:
    """A 32-layer LLaMA-style graph with tiny widths, LoRA inserted on q/v of every layer."""
    import surgeon
    from surgeon.compiled import node_table
    from surgeon.visualize import write_views
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(cfg).eval()
    args = (torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0)),)
    before = node_table(surgeon.capture(model, args, {"use_cache": False}))
    spec = {"adapters": [{"name": "chat", "type": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 2}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False}, verify=False)
    return write_views(folder, before, node_table(compiled.module), compiled.report.to_dict())[0]


def test_32_layer_graph_opens_collapsed_and_expands(browser, tmp_path_factory):
    page = llama32_page(tmp_path_factory.mktemp("llama32"))
    browser.errors.clear()
    seconds = browser.open(page.as_uri())
    stats = browser.js("window.surgeonView.stats()")
    print(f"\n32-layer view: {stats['nodes']} nodes, opened in {seconds:.2f} s "
          f"(script {stats['ms']:.0f} ms), {stats['items']} boxes at first")
    assert stats["nodes"] > 2500 and stats["items"] < 100            # blocks start collapsed
    last = "#plane .block[data-key='bmodel.layers.31']"
    assert browser.js(f"document.querySelector(\"{last}\")") is None       # out of view: not in the DOM
    browser.js("document.getElementById('canvas').scrollTop = 1e9")       # scrolling brings it in
    browser.wait(f"document.querySelector(\"{last}\") !== null")
    browser.click("#plane .block[data-key='bmodel.layers.31']")
    assert browser.js("document.querySelector(\"#plane .frame[data-key='fmodel.layers.31']\") !== null")
    start = time.perf_counter()
    browser.click("#expand-all")
    stats = browser.js("window.surgeonView.stats()")
    print(f"expand all: {stats['items']} boxes laid out, {stats['rendered']} in the DOM, "
          f"{time.perf_counter() - start:.2f} s")
    assert stats["items"] > 2000 and stats["rendered"] < stats["items"] / 4    # only what is in view
    browser.type("#search", "model_layers_31_self_attn_v_proj_adapter_chat_lora_b")
    browser.wait("document.querySelector('#plane .sel') !== null")
    assert "model.layers.31.self_attn.v_proj.adapter_chat.lora_B" in browser.js(
        "document.getElementById('details').innerText")
    assert browser.errors == []
