"""Hostile input at the command line (issue 14): every failure is one line, output paths are
checked before any work and never written through a symlink, the spec is checked before the
model factory runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import surgeon
from surgeon.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = "adapters:\n  - {name: a, type: lora, targets: ['a'], rank: 2}\n"
CALLS: list[str] = []   # which factories of this module ran


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def tiny():
    CALLS.append("tiny")
    torch.manual_seed(0)
    return Tiny(), (torch.randn(2, 8),)


def raising():
    CALLS.append("raising")
    raise ValueError("boom")


def interrupted():
    raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def no_calls_yet():
    CALLS.clear()


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def saved(tmp_path) -> Path:
    """A saved compile (with its before-snapshot) for `surgeon show`."""
    model, args = tiny()
    return surgeon.compile(model, args, SPEC).save(tmp_path / "saved")


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("surgeon: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def surgeon_cli(*argv: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SURGEON_DEBUG"} | env
    return subprocess.run([sys.executable, "-m", "surgeon", *argv], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


# ---- one clean line per error; --traceback / SURGEON_DEBUG=1 for the rest

def test_a_raising_model_factory_is_one_line_in_a_real_process(tmp_path, spec):
    argv = ["compile", "--model", "tests.test_hostile_cli:raising", "--spec", str(spec), "--out", str(tmp_path / "o")]
    plain = surgeon_cli(*argv)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr == "surgeon: error: model factory tests.test_hostile_cli:raising raised ValueError: boom\n"
    for run in (surgeon_cli("--traceback", *argv), surgeon_cli(*argv, "--traceback"),
                surgeon_cli(*argv, SURGEON_DEBUG="1")):
        assert run.returncode == 2
        assert "Traceback (most recent call last)" in run.stderr and 'raise ValueError("boom")' in run.stderr
        assert run.stderr.endswith("surgeon: error: model factory tests.test_hostile_cli:raising raised "
                                   "ValueError: boom\n")


def test_a_keyboard_interrupt_is_one_line_and_status_130(tmp_path, spec, capsys):
    assert main(["compile", "--model", "tests.test_hostile_cli:interrupted", "--spec", str(spec),
                 "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "surgeon: error: interrupted\n"


def test_an_adapter_config_that_is_not_json_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()
    save_file({"a.weight": torch.zeros(8, 8)}, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    assert main(["merge-checkpoint", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "merged").exists()


def test_traceback_before_the_subcommand_keeps_bench_working(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--traceback", "bench", "-h"])
    assert info.value.code == 0 and "--rounds" in capsys.readouterr().out


def test_a_multi_line_message_is_printed_on_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  - name: a\n - type: lora\n")   # YAML's own message spans several lines
    assert main(["compile", "--model", "tests.test_hostile_cli:tiny", "--spec", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "not valid YAML")


# ---- output paths are checked before any work

@pytest.mark.parametrize("command", ["compile", "demo"])
def test_out_naming_a_file_fails_before_the_model_is_built(command, tmp_path, spec, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    argv = (["compile", "--model", "tests.test_hostile_cli:tiny", "--spec", str(spec)] if command == "compile"
            else ["demo", "--steps", "1"])
    assert main([*argv, "--out", str(out)]) == 2
    one_line_error(capsys, f"'{out}'", "not a folder")
    assert CALLS == [] and out.read_text() == "mine"


@pytest.mark.parametrize("option", ["--svg", "--dot", "--html"])
def test_show_into_a_missing_folder_is_an_error_and_creates_nothing(option, saved, tmp_path, capsys):
    target = tmp_path / "nowhere" / "deeper" / "view.out"
    assert main(["show", str(saved), option, str(target)]) == 2
    one_line_error(capsys, f"'{target.parent}'", "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_diff_html_into_a_missing_folder_is_an_error(saved, tmp_path, capsys):
    assert main(["diff", str(saved), "--html", str(tmp_path / "nowhere" / "d.html")]) == 2
    one_line_error(capsys, "does not exist")
    assert not (tmp_path / "nowhere").exists()


# ---- never write through a symlink: the link itself is replaced

def test_symlinks_among_the_saved_files_are_replaced_never_followed(tmp_path, spec, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("graph.py", "report.txt", "nodes.json", "graph.html", "graph.dot", "groups.json"):
        victims[name] = tmp_path / f"victim_{name}"
        victims[name].write_text("precious")
        (out / name).symlink_to(victims[name])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "adapters").symlink_to(elsewhere, target_is_directory=True)
    assert main(["compile", "--model", "tests.test_hostile_cli:tiny", "--spec", str(spec), "--out", str(out)]) == 0
    for name, victim in victims.items():
        assert victim.read_text() == "precious", name
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    assert list(elsewhere.iterdir()) == [] and not (out / "adapters").is_symlink()
    assert (out / "adapters" / "a" / "adapter.safetensors").is_file()
    assert "def forward" in (out / "graph.py").read_text()


def test_show_replaces_a_symlinked_output_file(saved, tmp_path, capsys):
    victim = tmp_path / "victim.html"
    victim.write_text("precious")
    (tmp_path / "view.html").symlink_to(victim)
    assert main(["show", str(saved), "--html", str(tmp_path / "view.html")]) == 0
    assert victim.read_text() == "precious" and not (tmp_path / "view.html").is_symlink()
    assert "<html" in (tmp_path / "view.html").read_text().lower()


# ---- the spec is checked before the model factory runs

def test_a_spec_typo_is_reported_before_the_factory_runs(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("adapters:\n  - {name: a, type: lora, targets: ['a'], rank: 2}\npipline: [insert]\n")
    assert main(["compile", "--model", "tests.test_hostile_cli:tiny", "--spec", str(typo),
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "pipline", "unknown key")
    assert CALLS == [] and not (tmp_path / "o").exists()


def test_target_checks_that_need_the_model_still_run_after_it(tmp_path, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("adapters:\n  - {name: a, type: lora, targets: ['*.q_proj'], rank: 2}\n")
    assert main(["compile", "--model", "tests.test_hostile_cli:tiny", "--spec", str(wrong),
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "matches no module of Tiny")
    assert CALLS == ["tiny"]
