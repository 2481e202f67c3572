"""The command line: demo end to end, compile from a factory, show, and clean errors."""
from __future__ import annotations

import pytest

from surgeon.cli import main


def test_demo_writes_artifacts_and_merges(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "merge" in out and "training loss" in out and "lora_linear regions -> surgeon::lora_linear" in out
    for name in ("report.txt", "graph.py", "nodes.json", "adapter/adapter.safetensors",
                 "adapter_peft/adapter_model.safetensors", "demo_spec.yaml", "lowered/nodes.json"):
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.txt").read_text()
    assert "insert" in report and "exact" in report and "merged" in report
    assert list((tmp_path / "lowered" / "kernels").glob("lora_linear@*.py"))


def test_compile_and_show(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("adapters:\n  - {name: a, type: lora, targets: ['*.q_proj'], rank: 2}\n")
    assert main(["compile", "--model", "surgeon.models:tiny_llama", "--spec", str(spec),
                 "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "out"), "--filter", "layers.0.self_attn.q_proj*"]) == 0
    shown = capsys.readouterr().out
    assert "lora_A" in shown and "insert" in shown and "layers.1" not in shown.split("made by")[-1]
    assert main(["show", str(tmp_path / "out"), "--groups"]) == 0
    groups = capsys.readouterr().out
    assert "layers.0.mlp.gate_proj" in groups and "residual" in groups


@pytest.mark.parametrize("argv,words", [
    (["compile", "--model", "nomodule:f", "--spec", "x.yaml", "--out", "o"], "cannot import"),
    (["compile", "--model", "surgeon.models:tiny_llama", "--spec", "/nonexistent.yaml", "--out", "o"],
     "does not exist"),
    (["show", "/nonexistent"], "not a saved compile"),
])
def test_cli_errors_are_one_clear_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgeon: error:") and words in err


def test_bench_is_wired_with_its_own_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "-h"])
    assert info.value.code == 0 and "--rounds" in capsys.readouterr().out


def test_bench_on_cuda_writes_each_tables_json_beside_the_models(monkeypatch, tmp_path, capsys):
    """What scripts/gpu_bench.sh relies on: --json F also names the kernel tables' files (the timing
    functions are replaced here; they need a GPU)."""
    import torch

    from surgeon.bench import family as bench_family, kernels as kernel_bench, models

    calls = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(models, "run", lambda *a: {"decode 1x4": {"eager base": 1.0}})
    monkeypatch.setattr(kernel_bench, "main", lambda argv: calls.setdefault("kernels", argv) and 0)
    monkeypatch.setattr(bench_family, "main", lambda argv: calls.setdefault("family", argv) and 0)
    assert main(["bench", "--device", "cuda", "--json", str(tmp_path / "bench.json"), "--kernel-budget", "200"]) == 0
    assert calls == {"kernels": ["--json", str(tmp_path / "bench_kernels.json"), "--budget", "200.0"],
                     "family": ["--json", str(tmp_path / "bench_family.json"), "--budget", "200.0"]}
    assert (tmp_path / "bench.json").exists() and "a GPU" in capsys.readouterr().out
