"""Capture: real architectures into the canonical graph, the fx fallback, and CaptureError."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import surgeon
from surgeon.rules import Pattern, find
from tests.conftest import assert_untouched, hf_bert, hf_gpt2, hf_llama, peft_lora_checkpoint, small_cnn, snapshot

EMPTY = {"adapters": [], "pipeline": []}


def _leaves(out):
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("factory,kwargs,site_ops,expected_sites", [
    (hf_llama, {"use_cache": False}, ("linear",), 15),     # 2 layers x 7 projections + lm_head
    (hf_gpt2, {"use_cache": False}, ("addmm",), 8),        # Conv1D: c_attn, c_proj, c_fc, mlp.c_proj per layer
    (small_cnn, None, ("conv2d",), 4),
])
def test_capture_matches_eager_and_knows_module_paths(factory, kwargs, site_ops, expected_sites):
    model, args = factory()
    before = snapshot(model)
    gm = surgeon.capture(model, args, kwargs)
    with torch.no_grad():
        want = _leaves(model(*args, **(kwargs or {})))
        got = _leaves(gm(*args))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sites = find(gm, Pattern(site_ops, "*"))
    assert len(sites) == expected_sites
    assert all(m.path for m in sites), "every op node knows its module path"
    assert_untouched(model, before)


def test_capture_bert_with_tensor_kwargs():
    model, args, kwargs = hf_bert()
    gm = surgeon.capture(model, args, kwargs)
    paths = {m.path for m in find(gm, Pattern(("linear",), "*.attention.self.query"))}
    assert paths == {"encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"}
    with torch.no_grad():
        want = model(*args, **kwargs).last_hidden_state
        got = gm(*args, attention_mask=kwargs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gpt2_conv1d_is_targetable_like_a_linear(gpt2):
    model, args = gpt2
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.c_attn", "*.c_fc"], "rank": 4}]}
    compiled = surgeon.compile(model, args, spec, {"use_cache": False})
    state = compiled.adapters["a"]
    assert {s.op for s in state.sites} == {"addmm"}
    assert len(state.sites) == 4
    c_attn = next(s for s in state.sites if s.path.endswith("c_attn"))
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)   # Conv1D weight is (in, out)


def host_bias(x):
    """Computed on the host through NumPy: torch.export cannot trace it, fx keeps it as a leaf call."""
    return torch.from_numpy(np.tanh(x.detach().numpy()))


torch.fx.wrap("host_bias")


class NeedsFallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x) + host_bias(x)


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:   # Python control flow on a tensor value
            return self.proj(x)
        return -x


class _Box:   # a plain object holding a tensor: no pytree knows how to flatten it
    def __init__(self, value):
        self.value = value


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return _Box(self.proj(x))   # neither front end can return it


def test_fx_fallback_normalizes_to_the_same_form():
    torch.manual_seed(0)
    model = NeedsFallback().eval()
    x = torch.randn(3, 4)
    gm = surgeon.capture(model, (x,))
    assert gm.meta["surgeon_frontend"] == "fx"
    matches = find(gm, Pattern(("linear",), "proj"))
    assert len(matches) == 1 and matches[0]["weight"].op == "get_attr"
    torch.testing.assert_close(gm(x), model(x))
    compiled = surgeon.compile(model, (x,), {"adapters": [{"name": "a", "type": "lora", "targets": ["proj"],
                                                           "rank": 2}], "pipeline": ["insert", "merge"]})
    assert compiled.adapters["a"].status == "merged"


def test_capture_error_names_both_front_ends():
    model = Untraceable()
    before = snapshot(model)
    with pytest.raises(surgeon.CaptureError) as info:
        surgeon.compile(model, (torch.ones(2, 4),), EMPTY)
    text = str(info.value)
    assert "torch.export failed" in text and "symbolic_trace (fallback) failed" in text and "try:" in text
    assert_untouched(model, before)


def test_a_value_dependent_branch_follows_the_example_and_refuses_the_other(capfd):
    """Before: CaptureError (GuardOnDataDependentSymNode; Longformer, LED, FSMT, DBRX). Now draft export
    follows the example's branch and keeps runtime assertions: the other branch is refused, never computed
    wrong, and the note names the model's line. torch.export's partial graph is not printed."""
    torch.manual_seed(0)
    model = ValueBranch().eval()
    before = snapshot(model)
    compiled = surgeon.compile(model, (torch.ones(2, 4),), EMPTY)
    note = next(n for n in compiled.report.rows[0].notes if "draft_export" in n)
    assert "test_capture.py:" in note and "if x.sum() > 0:" in note
    with torch.no_grad():
        x = torch.rand(3, 4) + 0.1
        torch.testing.assert_close(compiled.module(x), model(x), rtol=0, atol=0)
        with pytest.raises(surgeon.InputError, match="takes a path the captured graph does not have"):
            compiled.module(-torch.ones(2, 4))
    assert "def forward" not in capfd.readouterr().err
    assert_untouched(model, before)


def test_longformer_captures_takes_peft_lora_and_merges(tmp_path):
    """Longformer's global-attention switch reads the mask's values (a data-dependent guard)."""
    import peft
    from transformers import LongformerConfig, LongformerModel

    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, attention_window=[4, 4], max_position_embeddings=64)
    model = LongformerModel(cfg).eval()
    ids = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    wrapped = peft_lora_checkpoint(model, peft.LoraConfig(r=2, target_modules=["query", "value"]), tmp_path)
    compiled = surgeon.compile(model, (ids,), {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]})
    assert len(compiled.adapters["p"].sites) == 2 * 2
    with torch.no_grad():
        want = wrapped(ids).last_hidden_state
        torch.testing.assert_close(compiled.module(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        compiled.apply(["merge"])
        torch.testing.assert_close(compiled.module(ids).last_hidden_state, want, rtol=1e-5, atol=1e-5)
        glob = torch.ones_like(ids)
        glob[:, 0] = 2   # global attention on the first token: the branch the example did not take
        with pytest.raises(surgeon.InputError, match="modeling_longformer.py"):
            compiled.module(ids, attention_mask=glob)


class _Cache:
    def __init__(self, keys):
        self.keys = keys


class CachingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, use_cache: bool = True):
        y = self.proj(x)
        return (y, _Cache(y)) if use_cache else (y,)


def test_a_forward_that_returns_a_cache_object_is_captured_with_use_cache_false():
    """Before: 'Found <class _Cache> in output, which is not a known type' (T5-style encoder-decoders
    such as Switch Transformers and LongT5 return an EncoderDecoderCache by default)."""
    model = CachingModel().eval()
    compiled = surgeon.compile(model, (torch.randn(2, 4),), EMPTY)
    assert any("use_cache=False" in n for n in compiled.report.rows[0].notes)
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(x)[0], model(x)[0], rtol=0, atol=0)
        compiled.module(x, use_cache=False)
        with pytest.raises(surgeon.InputError, match="use_cache"):
            compiled.module(x, use_cache=True)


def test_switch_transformers_captures_and_takes_lora():
    from transformers import SwitchTransformersConfig, SwitchTransformersModel

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, num_experts=4, expert_capacity=8)
    model = SwitchTransformersModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["**.q", "**.v"], "rank": 2}], "pipeline": ["insert"]}
    compiled = surgeon.compile(model, (ids,), spec, {"decoder_input_ids": ids[:, :4]})
    assert len(compiled.adapters["a"].sites) == 2 * (2 + 2 + 2)   # encoder self, decoder self and cross attention
    with torch.no_grad():
        want = model(ids, decoder_input_ids=ids[:, :4], use_cache=False).last_hidden_state
        got = compiled.module(ids, decoder_input_ids=ids[:, :4]).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_capture_error_names_the_models_line():
    """Nystromformer's landmark attention cannot take the mask export builds: the error says where."""
    from transformers import NystromformerConfig, NystromformerModel

    cfg = NystromformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, num_landmarks=4, segment_means_seq_len=16,
                              max_position_embeddings=64)
    with pytest.raises(surgeon.CaptureError) as info:
        surgeon.compile(NystromformerModel(cfg).eval(), (torch.randint(0, 100, (2, 16)),), EMPTY)
    assert "modeling_nystromformer.py:" in str(info.value) and "attention_mask" in str(info.value)


class CastsItsRouter(nn.Module):
    """NLLB-MoE's router: `self.classifier = self.classifier.to(self.dtype)` on every call; then a
    branch on a tensor's value (NLLB-MoE's expert loop), so that export is tried more than once."""

    def __init__(self):
        super().__init__()
        self.to_dtype = torch.float32
        self.classifier, self.out = nn.Linear(8, 4), nn.Linear(8, 8)

    def forward(self, x):
        self.classifier = self.classifier.to(self.to_dtype)
        y = self.out(x) * self.classifier(x.to(self.to_dtype)).softmax(-1).amax(-1, keepdim=True).to(x.dtype)
        if y.abs().sum() >= 0:     # always taken
            y = y * 2
        return y


def test_a_module_cast_to_its_own_dtype_inside_forward_is_captured():
    """Before, capture failed with "_apply(): Couldn't swap Linear.weight" (NLLB-MoE): a `.to` that
    changes nothing still reassigns the parameters, and after a failed export attempt (the value
    branch) the next attempt found them in a state it could not swap."""
    torch.manual_seed(0)
    model, x = CastsItsRouter().eval(), torch.randn(2, 5, 8)
    compiled = surgeon.compile(model, (x,), {"adapters": [{"name": "a", "type": "lora", "targets": ["classifier"],
                                                                "rank": 2}]})
    with torch.no_grad():
        assert torch.equal(compiled.module(x), model(x))
        other = torch.randn(3, 2, 8)
        assert torch.equal(compiled.module(other), model(other))
    assert [s.path for s in compiled.adapters["a"].sites] == ["classifier"]
    assert nn.Module.to is torch.nn.modules.module.Module.to and "to" not in vars(CastsItsRouter)


def test_compiled_module_behaves_like_a_module(llama):
    model, args = llama
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"],
                                                           "rank": 2}]}, {"use_cache": False})
    module = compiled.module
    assert module.eval() is module and not module.training
    assert module.train() is module and module.training
    base_keys = set(model.state_dict())
    keys = set(module.state_dict())
    assert base_keys <= keys and all("adapter_a" in k for k in keys - base_keys)
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 2 * 2 * (64 + 64) * 1
    double = module.to(torch.float64)
    out = double(*args).logits
    assert out.dtype == torch.float64
    out.sum().backward()
    grads = [n for n, p in module.named_parameters() if p.grad is not None]
    assert grads and all("adapter_a" in n for n in grads)


def test_compiled_module_runs_under_torch_compile_and_reexports(llama):
    model, args = llama
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"],
                                                           "rank": 2}]}, {"use_cache": False})
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.add_(0.1)
        expected = compiled.module(*args).logits
        fast = torch.compile(compiled.module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(fast(*args).logits, expected, rtol=0, atol=0)
    again = torch.export.export(compiled.module, args)
    torch.testing.assert_close(again.module()(*args).logits, expected, rtol=0, atol=0)


def test_declared_dynamic_dims_serve_other_shapes():
    from torch.export import Dim

    model, args = hf_llama()
    dynamic = {"input_ids": {0: Dim("batch", max=16), 1: Dim("seq", max=64)}}
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"],
                                                           "rank": 2}]}, {"use_cache": False}, dynamic_shapes=dynamic)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.add_(0.1)
        unmerged = compiled.module(ids).logits
        compiled.apply(["merge"])
        merged = compiled.module(ids).logits
        eager = model(ids, use_cache=False).logits
    assert unmerged.shape == (3, 5, 128)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, eager, atol=1e-4)   # the merged adapter changed the function


def _module_dict_model(key: str) -> nn.Module:
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({key: nn.Linear(4, 4), "ok": nn.Linear(4, 4)})

        def forward(self, x):
            for block in self.blocks.values():
                x = block(x)
            return x

    return Blocks()


def test_a_module_name_that_would_inject_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    # torch.fx writes a non-identifier name unescaped into `getattr(self.blocks, "<name>")`: this key
    # closes the literal and calls os.system on the next line (before the check, it created the file)
    monkeypatch.chdir(tmp_path)
    key = 'a", None)\ngetattr(__import__("os"), "system")("touch ran")\n_x = ("'
    model = _module_dict_model(key)
    before = snapshot(model)
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["blocks.ok"], "rank": 2}], "pipeline": ["insert"]}
    with pytest.raises(surgeon.CaptureError, match="module 'blocks' has a child or tensor named 'a\", None"):
        surgeon.compile(model, (torch.randn(2, 4),), spec)
    assert not (tmp_path / "ran").exists()
    assert_untouched(model, before)


@pytest.mark.parametrize("key", ['a"b', "a\\b", "a\nb", "a'b", "a\x00b"])
def test_names_that_cannot_stand_in_generated_source_are_refused(key):
    with pytest.raises(surgeon.CaptureError, match="cannot be written into generated code safely"):
        surgeon.capture(_module_dict_model(key), (torch.randn(2, 4),))


@pytest.mark.parametrize("key", ["0", "layer-1", "résumé", "a b", "x+y"])
def test_unusual_but_harmless_names_still_capture(key):
    model = _module_dict_model(key)
    gm = surgeon.capture(model, (torch.randn(2, 4),))
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class _NoGradBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():                       # exported as a higher-order op around a submodule
            y = self.a(x).view(2, 2, 2)
        return self.b(x) + y.reshape(x.shape)


def test_an_error_inside_a_no_grad_block_leaves_grad_mode_on_and_prints_nothing(capfd):
    gm = surgeon.capture(_NoGradBlock(), (torch.randn(2, 4),))
    assert "wrap_with_set_grad_enabled" in gm.code
    with pytest.raises(RuntimeError) as caught:
        gm(torch.randn(2, 4, dtype=torch.float64))   # fails in the block: float64 input, float32 weight
    assert torch.is_grad_enabled()      # torch's op left it off for the rest of the process
    assert capfd.readouterr().err == ""  # torch.fx's __call__ printed the generated code
    assert any("linear" in note for note in caught.value.__notes__)   # the failing graph line, as a note
    with torch.no_grad():
        gm(torch.randn(2, 4))
        assert not torch.is_grad_enabled()   # and a caller's no_grad stays as it was


class _SpelledLinears(nn.Module):
    """Weight products written four ways, an activation product and a 3-D parameter's (not linear sites)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Parameter(torch.randn(8, 8) / 3) for _ in range(4))
        self.experts = nn.Parameter(torch.randn(2, 8, 8) / 3)

    def forward(self, x):
        h = x @ self.a.T
        h = torch.matmul(h, self.b.t())
        h = h @ self.c.transpose(0, 1)
        h = torch.matmul(h, self.d.permute(1, 0))
        scores = h @ h.transpose(-1, -2)             # activations: stays a matmul
        return scores @ h + (h.unsqueeze(0) @ self.experts).sum(0)


def test_weight_products_are_captured_as_linear_whatever_the_spelling():
    """Falcon computes x @ W.T: before, targets selected nothing ('select no linear/addmm/conv2d op')."""
    model, x = _SpelledLinears().eval(), torch.randn(2, 3, 8)
    gm = surgeon.capture(model, (x,))
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [n.args[1].target for n in linears] == ["a", "b", "c", "d"]
    assert sum(n.target is torch.ops.aten.matmul.default for n in gm.graph.nodes) == 3   # scores, @ h, experts
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_falcon_linears_take_adapters_and_match_peft(tmp_path):
    import peft
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=False, multi_query=True, bias=False)
    model = FalconForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    wrapped = peft_lora_checkpoint(model, peft.LoraConfig(r=2, target_modules=targets), tmp_path)
    compiled = surgeon.compile(model, (ids,), {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]},
                               {"use_cache": False})
    assert len(compiled.adapters["p"].sites) == 4 * 2
    with torch.no_grad():
        want = wrapped(ids, use_cache=False).logits
        torch.testing.assert_close(compiled.module(ids).logits, want, rtol=1e-5, atol=1e-5)
        compiled.apply(["merge"])
        torch.testing.assert_close(compiled.module(ids).logits, want, rtol=1e-5, atol=1e-5)


class _ProbeCache:
    """Stands in for a transformers Cache object in a forward's output (capture looks for 'Cache' in the name)."""


class _CachingModel(nn.Module):
    """A forward that returns a cache when its config says so, and then recomputes a buffer (as a rotary
    embedding may, to the same values): the fake-tensor probe for the cache must leave no fake tensor on the model."""

    def __init__(self):
        super().__init__()
        import types

        self.config = types.SimpleNamespace(use_cache=True)
        self.lin = nn.Linear(4, 4)
        self.register_buffer("freq", torch.ones(4))

    def forward(self, x, use_cache=None):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache:
            self.freq = self.freq.clone()   # the same values, a new tensor
            return self.lin(x) + self.freq, _ProbeCache()
        return (self.lin(x) + self.freq,)


def test_the_cache_probe_finds_the_cache_and_leaves_the_model_as_it_was():
    from torch._subclasses.fake_tensor import FakeTensor

    from surgeon.capture import _returns_cache

    model = _CachingModel().eval()
    before = snapshot(model)
    freq = model.freq
    x = torch.randn(2, 4)
    assert _returns_cache(model, (x,), {})
    assert model.freq is freq and not isinstance(model.freq, FakeTensor)
    assert_untouched(model, before)
    compiled = surgeon.compile(model, (x,), {"pipeline": []})
    assert any("use_cache=False" in note for note in compiled.report.rows[0].notes)
    assert not isinstance(model.freq, FakeTensor)   # (the model's own calls, in verification, replace it)
    assert_untouched(model, before)
    torch.testing.assert_close(compiled.module(x)[0], model(x, use_cache=False)[0], rtol=0, atol=0)
