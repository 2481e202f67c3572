"""`surgeon generate` and the demo's generation."""
from __future__ import annotations

import re

import torch

from surgeon.cli import main
from tests.conftest import hf_llama


def llama_factory():
    """A --model factory: a tiny transformers LLaMA, compiled with use_cache=False like every HF model."""
    model, args = hf_llama()
    return model, args, {"use_cache": False}


def generated(out: str) -> dict[int, tuple[list[int], list[int]]]:
    rows = re.findall(r"^prompt (\d+): ([\d ]+) -> ([\d ]*)$", out, flags=re.M)
    return {int(i): ([int(t) for t in p.split()], [int(t) for t in n.split()]) for i, p, n in rows}


def test_generate_command_matches_transformers_over_the_kv_cache(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("pipeline: []\n")
    argv = ["generate", "--model", "tests.test_generate_cli:llama_factory", "--spec", str(spec),
            "--prompt-ids", "5,9,3,7", "--prompt-ids", "4 2", "--max-new-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = generated(out)
    assert rows[0][0] == [5, 9, 3, 7] and rows[1][0] == [4, 2]
    model, _ = hf_llama()
    ids, mask = torch.tensor([[5, 9, 3, 7], [0, 0, 4, 2]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert [rows[0][1], rows[1][1]] == expected[:, 4:].tolist()
    assert "generate (cache): graphs built in" in out and "ms per token" in out


def test_generate_command_recompute_note_sampling_and_errors(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("adapters:\n  - {name: a, type: lora, targets: ['*.q_proj'], rank: 2}\n")
    base = ["generate", "--model", "surgeon.models:tiny_llama", "--spec", str(spec), "--max-new-tokens", "3"]
    assert main(base + ["--do-sample", "--seed", "1", "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    rows = generated(out)
    assert len(rows) == 2 and all(len(new) == 3 for _, new in rows.values())   # the example's two rows
    assert "generate (recompute)" in out and "takes no attention cache" in out
    assert main(base + ["--do-sample", "--seed", "1", "--top-k", "5"]) == 0
    assert generated(capsys.readouterr().out) == rows
    assert main(base + ["--prompt-ids", "1,x"]) == 2
    assert "expected token ids" in capsys.readouterr().err
    assert main(base + ["--prompt-ids", "1,999"]) == 2
    assert "vocabulary size 256" in capsys.readouterr().err


def test_demo_generates_with_the_trained_adapter(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "generated with the trained adapter" in out
    rows = generated(out)
    assert len(rows) == 2 and all(len(new) == 8 for _, new in rows.values())
    assert "takes no attention cache" in out
