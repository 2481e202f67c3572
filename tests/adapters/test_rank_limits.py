"""Each kind's own rank limit (AdapterKind.rank_limit), checked against the model before capture.

The check used to bound every kind's rank by min(in, out), which refused valid PEFT configs: MiSS takes
r <= in, HiRA, DeLoRA, GraLoRA and LoRA (default init) any r. Limits now follow PEFT where it has the kind;
an invalid rank is still refused, naming the module, its sizes and the kind's rule."""
from __future__ import annotations

import pytest

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import KW, NAME, assert_identity_insert, compile_kind, peft_parity, spec
from tests.conftest import hf_gpt2, hf_llama

K_PROJ = "model.layers.0.self_attn.k_proj"   # hf_llama's k_proj: 64 in -> 32 out (GQA)


@pytest.mark.parametrize("kind,options", [
    ("miss", {"rank": 48}),                                     # PEFT: r <= in = 64
    ("miss", {"rank": 64, "mode": "mini", "mini_rank": 4}),
    ("hira", {"rank": 80}),                                     # PEFT: any r
    ("lora", {"rank": 40}),
    ("dora", {"rank": 40}),
    ("hra", {"rank": 40}),
])
def test_ranks_past_min_in_out_that_peft_takes_are_accepted(kind, options):
    model, args, compiled = compile_kind(kind, ["*.k_proj"], **options)
    assert {s.options["rank"] for s in compiled.adapters[NAME].sites} == {options["rank"]}
    assert compiled.report.rows[-1].check != "changes function"


def test_a_peft_miss_checkpoint_with_r_above_out_imports_with_parity(tmp_path):
    """r = 48 on k_proj (64 -> 32): PEFT builds it (r <= in_features); it used to be refused on import."""
    peft = pytest.importorskip("peft")
    compiled = peft_parity(peft.MissConfig(target_modules=["k_proj"], r=48), tmp_path)
    assert {s.options["rank"] for s in compiled.adapters[NAME].sites} == {48}


@pytest.mark.parametrize("kind,options,rule", [
    ("miss", {"rank": 65}, "at most in = 64"),
    ("miss", {"rank": 48, "mode": "bat"}, r"at most min\(in, out\) in mode bat = 32"),
    ("lora", {"rank": 40, "init": "pissa"}, r"at most min\(in, out\) with init pissa / olora / loftq / corda = 32"),
    ("lora-xs", {"rank": 33}, r"at most min\(in, out\) = 32"),
    ("shira", {"rank": 22}, r"at most in·out / \(in \+ out\) = 21"),
])
def test_ranks_past_the_kind_s_limit_are_refused(kind, options, rule):
    model, args = hf_llama()
    with pytest.raises(surgeon.SpecError) as refused:
        surgeon.compile(model, args, spec(kind, ["*.k_proj"], **options), KW)
    message = str(refused.value)
    assert "adapters[0].rank" in message
    assert f"rank {options['rank']} exceeds what a {kind} adapter takes on '{K_PROJ}' (64 in, 32 out)" in message
    assert refused.match(rule)


def test_conv1d_sizes_are_read_in_x_out():
    """GPT-2's Conv1D stores its weight in x out: MiSS on c_fc (32 in -> 128 out) takes r <= 32, on
    mlp.c_proj (128 in -> 32 out) r up to 128."""
    model, args = hf_gpt2()
    with pytest.raises(surgeon.SpecError, match=r"\(32 in, 128 out\): at most in = 32"):
        surgeon.compile(model, args, spec("miss", ["*.c_fc"], rank=33), KW)
    model, args, compiled = compile_kind("miss", ["*.mlp.c_proj"], factory=hf_gpt2, rank=64)
    assert_identity_insert(compiled, model, args)


def test_every_kind_with_a_rank_declares_a_limit_or_none():
    """A limit is a (bound, rule) pair or None (any rank); the default is min(in, out)."""
    for name, kind in kinds().items():
        if "rank" not in kind.options:
            continue
        opts = {key: option.default for key, option in kind.options.items()}
        limit = kind.rank_limit(opts, 64, 32)
        assert limit is None or (isinstance(limit[0], int) and 0 < limit[0] <= 64 and limit[1]), name
