"""A compiled module moves like the model it stands in for: .to(dtype) / .half() / .bfloat16() / .float() /
.to(device), with no dtype or device constant of the old setting left in the graph (surgeon.portable)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import surgeon
from surgeon.errors import SurgeonError
from surgeon.models import TinyLlama, tiny_llama
from surgeon.pipeline import TOLERANCE
from tests.conftest import hf_bert, hf_gpt2, hf_llama, lora_spec, randomize_adapters

KW = {"use_cache": False}
CASES = {   # factory, LoRA targets, keyword inputs
    "llama": (hf_llama, ["*.q_proj", "*.v_proj", "*.down_proj"], KW),
    "gpt2": (hf_gpt2, ["*.c_attn", "*.mlp.c_proj"], KW),
    "bert": (hf_bert, ["*.query", "*.value"], None),
}


def build(case: str):
    """(model with bf16-representable weights, args, kwargs, spec): a bf16 round trip then loses nothing."""
    factory, targets, kwargs = CASES[case]
    made = factory()
    model, args = made[0], made[1]
    kwargs = made[2] if kwargs is None else kwargs
    round_to(model, torch.bfloat16)
    return model, args, kwargs, lora_spec(targets, rank=4, alpha=8)


def round_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype))


def compiled_with_adapter(model, args, kwargs, spec, pipeline=()):
    compiled = surgeon.compile(model, args, spec, kwargs)
    randomize_adapters(compiled.module)
    round_to(compiled.module, torch.bfloat16)
    if pipeline:
        compiled.apply(list(pipeline))
    return compiled


def tensor_inputs(kwargs):
    return {k: v for k, v in (kwargs or {}).items() if isinstance(v, torch.Tensor)}


def first(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def run(module, args, kwargs=None) -> torch.Tensor:
    with torch.no_grad():
        return first(module(*args, **tensor_inputs(kwargs)))


def fresh_compile(model, args, kwargs, spec, dtype, state, pipeline=()):
    """The model converted to `dtype` first, compiled with the same spec and loaded with `state`."""
    fresh = surgeon.compile(copy.deepcopy(model).to(dtype), args, spec, kwargs)
    if pipeline:
        fresh.apply(list(pipeline))
    missing, unexpected = fresh.module.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "adapter" in k or "lora" in k]
    return fresh


def eager_peft(model, compiled, dtype, tmp_path, args, kwargs):
    """The eager model converted to `dtype` holding the same adapter through PEFT (adapter kept in `dtype`)."""
    peft = pytest.importorskip("peft")
    compiled.save_adapter("chat", tmp_path, format="peft")
    base = copy.deepcopy(model).to(dtype).eval()
    wrapped = peft.PeftModel.from_pretrained(base, str(tmp_path), autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        return first(wrapped(*args, **(kwargs or {})))


def assert_close(got, want, dtype):
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert got.dtype == want.dtype and rel <= TOLERANCE[dtype], f"relative error {rel:.3g} > {TOLERANCE[dtype]}"


def constants(gm):
    """Every dtype and device constant in the graph's node arguments: (node, value)."""
    found = []
    for node in gm.graph.nodes:
        torch.fx.node.map_aggregate((node.args, node.kwargs), lambda v, n=node: found.append((n, v))
                                    if isinstance(v, (torch.dtype, torch.device)) else None)
    return found


# ---------------------------------------------------------------- dtype moves on real models

@pytest.mark.parametrize("case", CASES)
def test_bfloat16_matches_eager_and_a_fresh_bf16_compile_and_float_comes_back_exactly(case, tmp_path):
    model, args, kwargs, spec = build(case)
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    fp32 = run(compiled.module, args, kwargs)
    assert compiled.module.to(torch.bfloat16) is compiled.module
    bf16 = run(compiled.module, args, kwargs)
    assert bf16.dtype == torch.bfloat16
    assert compiled.module.dtype == torch.bfloat16 and all(
        p.dtype == torch.bfloat16 for p in compiled.module.parameters() if p.is_floating_point())
    fresh = fresh_compile(model, args, kwargs, spec, torch.bfloat16, compiled.module.state_dict())
    assert torch.equal(bf16, run(fresh.module, args, kwargs))               # bit for bit: the same graph
    assert_close(bf16, eager_peft(model, compiled, torch.bfloat16, tmp_path, args, kwargs), torch.bfloat16)
    # no constant of the old dtype or of the device is left; what stays is a fixed (intended) one
    left = constants(compiled.module)
    assert not [v for _, v in left if isinstance(v, torch.device)]
    assert not [v for _, v in left if v == torch.bfloat16]
    back = compiled.module.float()
    assert back is compiled.module and compiled.module.dtype == torch.float32
    assert torch.equal(run(compiled.module, args, kwargs), fp32)           # the weights were bf16-exact


def test_hf_llama_keeps_its_fp32_upcasts_and_follows_elsewhere():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    casts = lambda: [n for n in compiled.module.graph.nodes if n.target is torch.ops.aten.to.dtype]  # noqa: E731
    before = len(casts())
    compiled.module.bfloat16()
    fixed = [n for n in casts() if n.args[1] == torch.float32]
    following = [n for n in casts() if isinstance(n.args[1], torch.fx.Node)]
    assert len(casts()) == before and fixed and following
    assert len(fixed) + len(following) == before
    # RMSNorm: hidden.to(float32) stays; hidden.to(input_dtype) reads the module's dtype
    assert all(n.meta["surgeon_path"].endswith(("norm", "rotary_emb")) or "layernorm" in n.meta["surgeon_path"]
               for n in fixed)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_half_after_bfloat16_and_directly(case, tmp_path):
    model, args, kwargs, spec = build(case)
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    twin, never_moved = copy.deepcopy(compiled.module), copy.deepcopy(compiled.module)
    compiled.module.bfloat16()
    compiled.module.half()
    fp16 = run(compiled.module, args, kwargs)
    assert fp16.dtype == torch.float16
    assert torch.equal(fp16, run(twin.half(), args, kwargs))                # directly, or through bf16
    fresh = fresh_compile(model, args, kwargs, spec, torch.float16, compiled.module.state_dict())
    assert torch.equal(fp16, run(fresh.module, args, kwargs))
    assert_close(fp16, eager_peft(model, compiled, torch.float16, tmp_path, args, kwargs), torch.float16)
    compiled.module.float()                  # fp16 rounds the smallest bf16 weights: compare on the same weights
    never_moved.load_state_dict(compiled.module.state_dict())
    assert torch.equal(run(compiled.module, args, kwargs), run(never_moved, args, kwargs))


def test_to_dtype_keyword_and_double():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    fp32 = run(compiled.module, args, kwargs)
    compiled.module.to(dtype=torch.float64)
    fp64 = run(compiled.module, args, kwargs)
    assert fp64.dtype == torch.float64
    assert_close(fp64.float(), fp32, torch.float32)
    fresh = fresh_compile(model, args, kwargs, spec, torch.float64, compiled.module.state_dict())
    assert torch.equal(fp64, run(fresh.module, args, kwargs))               # every follow-cast now in fp64
    assert torch.equal(run(compiled.module.to(torch.float32), args, kwargs), fp32)


def test_merged_adapter_moves():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec, pipeline=["merge"])
    fp32 = run(compiled.module, args, kwargs)
    compiled.module.bfloat16()
    bf16 = run(compiled.module, args, kwargs)
    fresh = surgeon.compile(copy.deepcopy(model).bfloat16(), args, {"pipeline": []}, kwargs)
    fresh.module.load_state_dict(compiled.module.state_dict())               # the merged weights, in bf16
    assert torch.equal(bf16, run(fresh.module, args, kwargs))
    assert_close(bf16.float(), fp32, torch.bfloat16)


def test_quantized_adapter_moves():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec, pipeline=[{"quantize-adapters": {"bits": 4}}])
    fp32 = run(compiled.module, args, kwargs)
    never_moved = copy.deepcopy(compiled.module)
    compiled.module.bfloat16()
    bf16 = run(compiled.module, args, kwargs)
    assert bf16.dtype == torch.bfloat16 and not [v for _, v in constants(compiled.module)
                                                 if isinstance(v, torch.device)]
    assert_close(bf16.float(), fp32, torch.bfloat16)
    # the decode follows the module's dtype (its fp32 scales are converted like every floating buffer, so
    # they come back bf16-rounded): back in fp32 it computes what the unmoved graph does on those weights
    compiled.module.float()
    never_moved.load_state_dict(compiled.module.state_dict())
    assert torch.equal(run(compiled.module, args, kwargs), run(never_moved, args, kwargs))


def test_passes_run_after_a_move_see_the_new_dtype():
    model, args, kwargs, _ = build("llama")
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 4},
                         {"name": "b", "type": "lora", "targets": ["*.v_proj"], "rank": 4}],
            "pipeline": [{"insert": {"adapters": ["a"]}}]}
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    compiled.module.bfloat16()
    assert {n.meta["val"].dtype for n in compiled.module.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.aten.linear.default} == {torch.bfloat16}
    compiled.apply([{"insert": {"adapters": ["b"]}}])               # verified by the pass manager, in bf16
    added = [p for name, p in compiled.module.named_parameters() if "v_proj" in name and p.requires_grad]
    assert added and {p.dtype for p in added} == {torch.bfloat16}
    assert run(compiled.module, args, kwargs).dtype == torch.bfloat16
    assert run(compiled.module.float(), args, kwargs).dtype == torch.float32


def test_the_model_may_be_gone_and_without_a_copy_the_move_is_refused():
    import gc

    model, args, kwargs, spec = build("gpt2")
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    other = compiled_with_adapter(model, args, kwargs, spec)
    del model
    gc.collect()
    assert run(compiled.module.bfloat16(), args, kwargs).dtype == torch.bfloat16   # a weightless copy was kept
    record = other.module.meta["surgeon_capture"]
    record.skeleton, record.model, record.why_no_skeleton = None, None, "a stand-in reason"
    code = other.module.code
    with pytest.raises(SurgeonError, match=r"(?s)GPT2LMHeadModel\), which is gone.*a stand-in reason.*compile the "
                                           r"model in torch\.float16"):
        other.module.half()
    assert other.module.code == code and other.module.dtype == torch.float32


# ---------------------------------------------------------------- the built-in tiny LLaMA

class FloatRotaryTinyLlama(TinyLlama):
    """TinyLlama as it was before its rotary tables took the activations' dtype: q * cos promotes to
    fp32, so the model itself fails in bf16 (SDPA: query, key and value of different dtypes)."""

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).float()
        freqs = torch.outer(positions, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed_tokens(input_ids)
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def test_a_model_that_fails_in_bf16_itself_is_refused_and_left_as_it_was():
    model, args = tiny_llama()
    unportable = FloatRotaryTinyLlama(model.cfg).eval()
    unportable.load_state_dict(model.state_dict())
    compiled = surgeon.compile(unportable, args, lora_spec(["*.q_proj"]))
    before, code = run(compiled.module, args), compiled.module.code
    with pytest.raises(RuntimeError):
        copy.deepcopy(unportable).bfloat16()(*args)                         # the eager model itself
    with pytest.raises(SurgeonError, match=r"(?s)torch\.bfloat16.*failed: RuntimeError: Expected query, key.*"
                                           r"compile the model in torch\.bfloat16"):
        compiled.module.bfloat16()
    assert compiled.module.code == code
    assert compiled.module.dtype == torch.float32                           # nothing converted
    assert all(t.dtype == torch.float32 for t in compiled.module.state_dict().values() if t.is_floating_point())
    assert torch.equal(run(compiled.module, args), before)                  # still works as it was


def test_the_builtin_tiny_llama_moves_to_bf16():
    model, args = tiny_llama()
    round_to(model, torch.bfloat16)
    spec = lora_spec(["*.q_proj", "*.up_proj"])
    compiled = compiled_with_adapter(model, args, None, spec)
    fp32 = run(compiled.module, args)
    bf16 = run(compiled.module.bfloat16(), args)
    fresh = fresh_compile(model, args, None, spec, torch.bfloat16, compiled.module.state_dict())
    assert torch.equal(bf16, run(fresh.module, args))
    assert torch.equal(run(compiled.module.float(), args), fp32)


# ---------------------------------------------------------------- devices

def test_device_move_to_meta_runs_and_leaves_no_device_constant():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    assert constants(compiled.module) and [v for _, v in constants(compiled.module) if isinstance(v, torch.device)]
    moved = copy.deepcopy(compiled.module).to("meta")
    assert moved.device.type == "meta" and compiled.module.device.type == "cpu"
    out = run(moved, [a.to("meta") for a in args], kwargs)
    assert out.device.type == "meta" and out.shape == run(compiled.module, args, kwargs).shape
    assert not [v for _, v in constants(moved) if isinstance(v, torch.device)]
    both = copy.deepcopy(compiled.module).to("meta", torch.bfloat16)
    out = run(both, [a.to("meta") for a in args], kwargs)
    assert (out.device.type, out.dtype) == ("meta", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_back(tmp_path):
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec)
    fp32 = run(compiled.module, args, kwargs)
    compiled.module.cuda()
    assert compiled.module.device.type == "cuda"
    got = run(compiled.module, [a.cuda() for a in args], kwargs)
    assert_close(got.cpu(), fp32, torch.float32)
    bf16 = run(compiled.module.bfloat16(), [a.cuda() for a in args], kwargs)
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cuda"
    assert torch.equal(run(compiled.module.cpu().float(), args, kwargs), fp32)


def test_dtype_and_device_properties_follow():
    model, args, kwargs, spec = build("gpt2")
    module = compiled_with_adapter(model, args, kwargs, spec).module
    assert (module.dtype, module.device) == (torch.float32, torch.device("cpu"))
    for move, dtype in ((torch.nn.Module.half, torch.float16), (torch.nn.Module.bfloat16, torch.bfloat16),
                        (torch.nn.Module.float, torch.float32)):
        move(module)
        out = run(module, args, kwargs)
        assert module.dtype == out.dtype == dtype and module.device == out.device == torch.device("cpu")
    meta = copy.deepcopy(module).to("meta", torch.bfloat16)
    out = run(meta, [a.to("meta") for a in args], kwargs)
    assert (meta.dtype, meta.device.type) == (out.dtype, out.device.type) == (torch.bfloat16, "meta")
    assert (module.dtype, module.device) == (torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------- refusals

def test_lowered_elementwise_regions_are_refused_and_left_as_they_were():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec, pipeline=["fuse", "lower"])
    before = run(compiled.module, args, kwargs)
    with pytest.raises(SurgeonError, match=r"(?s)surgeon::pointwise.*elementwise: false.*compile"):
        compiled.module.to(torch.bfloat16)
    assert compiled.module.dtype == torch.float32
    assert torch.equal(run(compiled.module, args, kwargs), before)


def test_lowered_lora_linear_regions_move():
    model, args, kwargs, spec = build("llama")
    compiled = compiled_with_adapter(model, args, kwargs, spec, pipeline=["fuse", {"lower": {"elementwise": False}}])
    fp32 = run(compiled.module, args, kwargs)
    bf16 = run(compiled.module.bfloat16(), args, kwargs)
    fresh = fresh_compile(model, args, kwargs, spec, torch.bfloat16, compiled.module.state_dict(),
                          pipeline=["fuse", {"lower": {"elementwise": False}}])
    assert torch.equal(bf16, run(fresh.module, args, kwargs))
    assert torch.equal(run(compiled.module.float(), args, kwargs), fp32)


def test_graphs_that_differ_by_dtype_are_refused():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.proj(x)
            return F.relu(y) if y.dtype == torch.float32 else torch.tanh(y)

    x = torch.randn(2, 8)
    compiled = surgeon.compile(Branchy().eval(), (x,), {"pipeline": []})
    before = run(compiled.module, (x,))
    with pytest.raises(SurgeonError, match=r"(?s)differs.*compile the model in torch\.float16"):
        compiled.module.half()
    assert torch.equal(run(compiled.module, (x,)), before)
    compiled.module.to("meta")                                               # a device move needs no probe
    assert compiled.module.device.type == "meta"


def test_finfo_constants_follow():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, mask):
            scores = self.proj(x)
            scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
            return scores.softmax(-1)

    model = Masked().eval()
    round_to(model, torch.bfloat16)
    x, mask = torch.randn(2, 8).bfloat16().float(), (torch.arange(8) % 3 != 0).long().expand(2, 8)
    compiled = surgeon.compile(model, (x, mask), {"pipeline": []})
    fp32 = run(compiled.module, (x, mask))
    bf16 = run(compiled.module.bfloat16(), (x.bfloat16(), mask))
    fresh = surgeon.compile(copy.deepcopy(model).bfloat16(), (x.bfloat16(), mask), {"pipeline": []})
    assert torch.equal(bf16, run(fresh.module, (x.bfloat16(), mask)))
    assert torch.equal(run(compiled.module.float(), (x, mask)), fp32)


def test_passes_applied_after_a_move_check_on_the_example_moved_with_the_module():
    """A CNN's floating example stayed fp32 after `.double()`: the next pass's check then failed with
    'Input type (torch.FloatTensor) and weight type (torch.DoubleTensor) should be the same'."""
    from tests.conftest import small_cnn

    model, (x,) = small_cnn()
    compiled = surgeon.compile(model, (x,), lora_spec(["head"]))
    compiled.module.double()
    compiled.apply(["merge"])
    assert compiled.report.rows[-1].check.startswith("rel err")
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(x.double()), copy.deepcopy(model).double()(x.double()),
                                   rtol=1e-10, atol=1e-12)
