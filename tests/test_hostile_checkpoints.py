"""Checkpoints and adapter folders from strangers: hostile paths, links, signals, lying numbers and configs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import surgeon
import surgeon.merge_checkpoint as mc
from surgeon.adapter_io import load_adapter_dir, load_peft_dir, save_adapter_dir, save_peft_dir
from surgeon.adapters import kinds
from tests.test_merge_checkpoint import LORA_OPTS, small_checkpoint, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"


def merge(tmp_path: Path, **kwargs):
    return mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", **kwargs)


def assert_nothing_written(tmp_path: Path, *extra: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", "base", *extra])   # no out, no temp


def point_index_at(tmp_path: Path, shard: str) -> None:
    """Rename the base's first shard in its index to `shard`."""
    index = json.loads((tmp_path / "base" / INDEX).read_text())
    first = min(index["weight_map"].values())
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    (tmp_path / "base" / INDEX).write_text(json.dumps(index))


# ---------------------------------------------------------------- shard names and links

@pytest.mark.parametrize("shard", ["../elsewhere/victim.safetensors", "../base/model-00001-of-00002.safetensors",
                                   "/tmp/abs.safetensors", "sub/x.safetensors", "sub\\x.safetensors", "..", ".", ""])
def test_shard_names_must_be_plain_names_in_the_base_folder(tmp_path, shard):
    small_checkpoint(tmp_path)
    victim = tmp_path / "elsewhere" / "victim.safetensors"
    victim.parent.mkdir()
    save_file({"layers.0.proj.weight": torch.ones(8, 6)}, str(victim))
    point_index_at(tmp_path, shard)
    inputs = {p: p.read_bytes() for p in [victim, *(tmp_path / "base").iterdir()]}
    named = re.escape(f"shard {shard!r} named by '{tmp_path / 'base' / INDEX}'")
    with pytest.raises(surgeon.SurgeonError, match=named):
        merge(tmp_path)
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert_nothing_written(tmp_path, "elsewhere")


@pytest.mark.parametrize("which", ["model-00001-of-00002.safetensors", INDEX, "config.json"])
def test_links_in_the_base_folder_are_refused(tmp_path, which):
    small_checkpoint(tmp_path)
    real = tmp_path / "adapter" / "secret"
    (tmp_path / "base" / which).rename(real)
    (tmp_path / "base" / which).symlink_to(real)
    with pytest.raises(surgeon.SurgeonError, match=rf"'{tmp_path / 'base' / which}' is a symbolic link"):
        merge(tmp_path)
    assert_nothing_written(tmp_path)


def test_a_single_file_checkpoint_that_is_a_link_is_refused(tmp_path):
    small_checkpoint(tmp_path)
    write_checkpoint({"layers.0.proj.weight": torch.ones(8, 6)}, tmp_path / "single", shards=1)
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "adapter" / "secret")
    (tmp_path / "single" / "model.safetensors").symlink_to(tmp_path / "adapter" / "secret")
    with pytest.raises(surgeon.SurgeonError, match="model.safetensors' is a symbolic link"):
        mc.merge_checkpoint(tmp_path / "single", tmp_path / "adapter", tmp_path / "out")


def test_an_out_that_is_a_link_is_refused(tmp_path):
    small_checkpoint(tmp_path)
    (tmp_path / "out").symlink_to(tmp_path / "target")   # dangling: exists() is False
    with pytest.raises(surgeon.SurgeonError, match=r"output folder '.*out' .*symbolic link"):
        merge(tmp_path)
    assert not (tmp_path / "target").exists() and not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- signals and stale temporary folders

CHILD = """
import sys, time
from pathlib import Path
import surgeon.merge_checkpoint as mc

root, marker = Path(sys.argv[1]), Path(sys.argv[2])
original = mc.merged_tensor

def slow(*args):
    marker.write_text("writing")
    time.sleep(120)
    return original(*args)

mc.merged_tensor = slow
mc.merge_checkpoint(root / "base", root / "adapter", root / "out")
"""


def start_child(tmp_path: Path, name: str) -> subprocess.Popen:
    """A merge into tmp_path/out that stops in its first merged tensor, with a temporary folder half written."""
    script = tmp_path.parent / f"{tmp_path.name}-child.py"
    script.write_text(CHILD)
    marker = tmp_path.parent / f"{tmp_path.name}-{name}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(marker)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child merge did not start"
        time.sleep(0.05)
    return child


def temp_folders(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob(".out.*"))


def test_sigterm_removes_the_temporary_folder(tmp_path):
    small_checkpoint(tmp_path)
    child = start_child(tmp_path, "term")
    assert len(temp_folders(tmp_path)) == 1
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == -signal.SIGTERM          # killed by the signal, as usual
    assert_nothing_written(tmp_path)


def test_a_killed_runs_temporary_folder_is_removed_a_live_runs_is_kept(tmp_path):
    small_checkpoint(tmp_path)
    live = start_child(tmp_path, "live")
    try:
        live_temp = temp_folders(tmp_path)
        killed = start_child(tmp_path, "killed")
        killed.kill()
        assert killed.wait(timeout=60) == -signal.SIGKILL
        left = [name for name in temp_folders(tmp_path) if name not in live_temp]
        assert len(live_temp) == 1 and len(left) == 1           # SIGKILL cannot clean up ...
        merge(tmp_path)                                         # ... the next run does
        assert temp_folders(tmp_path) == live_temp and (tmp_path / "out").is_dir()
    finally:
        live.kill()
        live.wait(timeout=60)


# ---------------------------------------------------------------- numbers that lie

def lora_weights(gen: torch.Generator, rank: int = 4) -> dict:
    return {"lora_A": torch.randn(rank, 6, generator=gen), "lora_B": torch.randn(8, rank, generator=gen)}


def save_adapter(directory: Path, weights: dict, fmt: str, options: dict = LORA_OPTS) -> Path:
    if fmt == "peft":
        save_peft_dir(directory, options, weights, set())
        return directory / "adapter_model.safetensors"
    save_adapter_dir(directory, "a", "lora", options, weights, {})
    return directory / "adapter.safetensors"


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_adapter_is_refused_by_merge_checkpoint(tmp_path, fmt, bad):
    small_checkpoint(tmp_path)
    weights = {"layers.0.proj": lora_weights(torch.Generator().manual_seed(1))}
    weights["layers.0.proj"]["lora_B"][3, 1] = bad
    file = save_adapter(tmp_path / "adapter", weights, fmt)
    key = "base_model.model.layers.0.proj.lora_B.weight" if fmt == "peft" else "layers.0.proj.lora_B"
    with pytest.raises(surgeon.SurgeonError, match=rf"'{file}'.*tensor '{key}'.*NaN or Inf.*allow_nonfinite"):
        merge(tmp_path)
    assert_nothing_written(tmp_path)
    merge(tmp_path, allow_nonfinite=True)                       # the explicit opt-out writes it as it is
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
def test_nonfinite_adapter_is_refused_by_the_loaders(tmp_path, fmt):
    weights = {"layers.0.proj": lora_weights(torch.Generator().manual_seed(1))}
    weights["layers.0.proj"]["lora_A"][0, 0] = float("nan")
    file = save_adapter(tmp_path / "adapter", weights, fmt)
    load, key = (load_peft_dir, "from_peft") if fmt == "peft" else (load_adapter_dir, "from_dir")
    with pytest.raises(surgeon.SpecError, match=rf"'{file}'.*lora_A.*NaN or Inf"):
        load(tmp_path / "adapter")
    with pytest.raises(surgeon.SpecError, match=rf"adapters\[0\]\.{key}.*lora_A.*NaN or Inf"):
        surgeon.load_spec({"adapters": [{"name": "x", key: str(tmp_path / "adapter")}]})
    loaded = load(tmp_path / "adapter", allow_nonfinite=True)
    assert torch.isnan(loaded.weights["layers.0.proj"]["lora_A"][0, 0])
    spec = surgeon.load_spec({"adapters": [{"name": "x", key: str(tmp_path / "adapter"), "allow_nonfinite": True}]})
    assert torch.isnan(spec.adapters[0].loaded.weights["layers.0.proj"]["lora_A"][0, 0])   # the spec's opt-out
    with pytest.raises(surgeon.SpecError, match=r"adapters\[0\]\.allow_nonfinite: must be true or false"):
        surgeon.load_spec({"adapters": [{"name": "x", key: str(tmp_path / "adapter"), "allow_nonfinite": "yes"}]})


def test_the_cli_refuses_a_nonfinite_adapter_in_one_line_unless_allowed(tmp_path, capsys):
    from surgeon.cli import main

    small_checkpoint(tmp_path)
    weights = {"layers.0.proj": lora_weights(torch.Generator().manual_seed(1))}
    weights["layers.0.proj"]["lora_B"][0, 0] = float("nan")
    save_adapter(tmp_path / "adapter", weights, "surgeon")
    argv = ["merge-checkpoint", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgeon: error: ") and err.count("\n") == 1 and "NaN or Inf" in err
    assert main([*argv, "--allow-nonfinite"]) == 0 and (tmp_path / "out").is_dir()


def test_a_merge_that_overflows_the_dtype_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    write_checkpoint({"layers.0.proj.weight": torch.randn(8, 6, generator=gen).half()}, tmp_path / "base", shards=1)
    weights = {"layers.0.proj": {"lora_A": torch.full((4, 6), 300.0), "lora_B": torch.full((8, 4), 300.0)}}
    save_adapter_dir(tmp_path / "adapter", "a", "lora", LORA_OPTS, weights, {})   # finite, but 3.6e5 > fp16's max
    with pytest.raises(surgeon.SurgeonError, match="'layers.0.proj.weight'.*not finite.*float16"):
        merge(tmp_path)
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------- configs that disagree with their tensors

def peft_folder(directory: Path, kind: str, dims: tuple[int, int], **options) -> dict:
    """A PEFT folder for one module 'layers.0.proj' of `kind` with rank 4; returns its config."""
    table = kinds()[kind]
    opts = {key: option.default for key, option in table.options.items()} | {"rank": 4, **options}
    params = table.init(opts, dims[1], dims[0], torch.float32, torch.Generator().manual_seed(0), torch.randn(*dims))
    save_peft_dir(directory, opts, {"layers.0.proj": params}, set(), kind=kind)
    return json.loads((directory / "adapter_config.json").read_text())


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("kind,dims,tensor", [
    ("lora", (8, 6), r"module 'layers.0.proj' has lora_A of shape \[4, 6\]"),
    ("dora", (8, 6), r"module 'layers.0.proj' has lora_A of shape \[4, 6\]"),
    ("loha", (8, 6), r"module 'layers.0.proj' has hada_w1_a of shape \[8, 4\]"),
    ("lokr", (256, 256), r"module 'layers.0.proj' has lokr_w2_a of shape \[16, 4\]"),
    ("hra", (8, 6), r"module 'layers.0.proj' has hra_u of shape \[6, 4\]"),
    ("vera", (8, 6), r"the shared vera_A has shape \[4, 6\]"),
])
def test_a_config_rank_that_disagrees_with_the_tensors_is_refused(tmp_path, kind, dims, tensor):
    peft_folder(tmp_path, kind, dims)
    load_peft_dir(tmp_path)                                     # as written, it loads
    rewrite_config(tmp_path, r=100000)
    with pytest.raises(surgeon.SpecError, match=rf"'{tmp_path}': adapter_config.json: r=100000 disagrees with the "
                                                rf"tensors: {tensor}"):
        load_peft_dir(tmp_path)


@pytest.mark.parametrize("r", [0, -4, 4.5, True])
def test_a_rank_that_is_not_positive_is_refused(tmp_path, r):
    peft_folder(tmp_path, "lora", (8, 6))
    rewrite_config(tmp_path, r=r)
    with pytest.raises(surgeon.SpecError, match=rf"r must be a positive integer, got {r!r}"):
        load_peft_dir(tmp_path)


def test_a_rank_pattern_that_disagrees_with_the_tensors_is_refused(tmp_path):
    peft_folder(tmp_path, "lora", (8, 6))
    rewrite_config(tmp_path, rank_pattern={"proj": 2})
    with pytest.raises(surgeon.SpecError,
                       match=r"rank_pattern\['proj'\]=2 disagrees .*'layers.0.proj' has lora_A of shape \[4, 6\]"):
        load_peft_dir(tmp_path)
    rewrite_config(tmp_path, rank_pattern={"(proj": 4})
    with pytest.raises(surgeon.SpecError, match=r"rank_pattern key '\(proj' is not a valid regular expression"):
        load_peft_dir(tmp_path)


def test_merge_checkpoint_refuses_rank_zero_and_a_rank_that_disagrees(tmp_path):
    small_checkpoint(tmp_path)
    peft_folder(tmp_path / "adapter2", "lora", (8, 6))
    rewrite_config(tmp_path / "adapter2", r=0)
    with pytest.raises(surgeon.SpecError, match="r must be a positive integer, got 0"):
        mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter2", tmp_path / "out")
    # surgeon's own format on a square weight, where the layout check cannot catch it
    square = tmp_path / "square"
    write_checkpoint({"layers.0.proj.weight": torch.randn(8, 8)}, square / "base", shards=1)
    gen = torch.Generator().manual_seed(0)
    weights = {"layers.0.proj": {"lora_A": torch.randn(4, 8, generator=gen),
                                 "lora_B": torch.randn(8, 4, generator=gen)}}
    for rank, message in ((0, r"adapter_config.json: options.rank: must be positive, got 0"),
                          (2, r"lora_A of module 'layers.0.proj' has shape \[4, 8\].*rank=2.*\[2, 8\]")):
        save_adapter_dir(square / "adapter", "a", "lora", {**LORA_OPTS, "rank": rank}, weights, {})
        with pytest.raises(surgeon.SpecError, match=message):
            mc.merge_checkpoint(square / "base", square / "adapter", square / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter2", "base", "square"]
    assert sorted(p.name for p in square.iterdir()) == ["adapter", "base"]


# ---------------------------------------------------------------- files that are not what they say

@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
@pytest.mark.parametrize("text,error", [(b'{"r": 4,', "is not valid JSON: .*line 1 column 9"),
                                        (b'{"r": "\xff"}', "is not valid JSON: .*position 7"),
                                        (b"[1, 2]", "must hold a JSON object, got list")])
def test_an_adapter_config_that_is_not_a_json_object_is_refused(tmp_path, fmt, text, error):
    write_checkpoint({"layers.0.proj.weight": torch.ones(8, 6)}, tmp_path / "base", shards=1)
    save_adapter(tmp_path / "adapter", {"layers.0.proj": lora_weights(torch.Generator())}, fmt)
    (tmp_path / "adapter" / "adapter_config.json").write_bytes(text)
    load = load_peft_dir if fmt == "peft" else load_adapter_dir
    for call in (lambda: load(tmp_path / "adapter"), lambda: merge(tmp_path)):
        with pytest.raises(surgeon.SpecError, match=rf"'{tmp_path / 'adapter' / 'adapter_config.json'}' {error}"):
            call()


@pytest.mark.parametrize("text,error", [(b'{"weight_map": ', "not valid JSON: .*line 1 column 16"),
                                        (b'["x"]', "must hold a JSON object, got list"),
                                        (b'{"weight_map": {"x": 3}}', "shard 3 for tensor 'x'")])
def test_an_index_that_is_not_json_is_refused(tmp_path, text, error):
    small_checkpoint(tmp_path)
    (tmp_path / "base" / INDEX).write_bytes(text)
    with pytest.raises(surgeon.SurgeonError, match=rf"'{tmp_path / 'base' / INDEX}'.*{error}"):
        merge(tmp_path)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("fmt", ["surgeon", "peft"])
def test_a_truncated_adapter_file_is_refused(tmp_path, fmt):
    small_checkpoint(tmp_path)
    file = save_adapter(tmp_path / "adapter", {"layers.0.proj": lora_weights(torch.Generator())}, fmt)
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(surgeon.SpecError, match=rf"'{file}' is not a readable safetensors file"):
        merge(tmp_path)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_a_truncated_shard_is_refused(tmp_path, cut):
    small_checkpoint(tmp_path)
    shard = tmp_path / "base" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(surgeon.SurgeonError, match=rf"'{shard}' is not a readable safetensors file"):
        merge(tmp_path)
    assert_nothing_written(tmp_path)


def test_the_previous_sigterm_handler_is_back_after_a_merge(tmp_path, monkeypatch):
    small_checkpoint(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    merge(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(mc, "merged_tensor", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        mc.merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out2")
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


# ---------------------------------------------------------------- indices that point outside the weight

def sparse_adapter(kind_name: str, options: dict, poison) -> dict:
    """One 6 -> 8 site's tensors of a sparse kind (its own init), one index then set by `poison`."""
    kind = kinds()[kind_name]
    opts = {name: option.default for name, option in kind.options.items()} | options
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    tensors = kind.init(opts, 6, 8, torch.float32, torch.Generator().manual_seed(1), weight)
    poison(tensors)
    return opts, {"layers.0.proj": tensors}


POISONED = {   # kind, options, the corruption, what the error says
    "shira": ({"fraction": 0.25}, lambda t: t["shira_indices"].__setitem__((1, 0), 6),
              r"row 1 of 'shira_indices' holds the index 6, outside \[0, 6\)"),
    "rosa": ({"rank": 2, "density": 0.25}, lambda t: t["rosa_indices"].__setitem__((0, 0), -1),
             r"row 0 of 'rosa_indices' holds the index -1, outside \[0, 8\)"),
    "lori": ({"rank": 2, "density": 0.5}, lambda t: t["lori_indices"].__setitem__((1, 0), 2),
             r"row 1 of 'lori_indices' holds the index 2, outside \[0, 2\)"),
    "supertuning": ({"sparsity": 0.5}, lambda t: t["supertuning_indices"].__setitem__(0, 48),
                    r"'supertuning_indices' holds the index 48, outside \[0, 48\)"),
}


class OneProjection(torch.nn.Module):
    """A module whose one linear is at the path the adapters name: layers.0.proj (6 -> 8)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].proj = torch.nn.Linear(6, 8)

    def forward(self, x):
        return self.layers[0].proj(x)


@pytest.mark.parametrize("kind_name", sorted(POISONED))
def test_an_index_outside_the_weight_is_refused_naming_the_tensor(tmp_path, kind_name):
    options, poison, message = POISONED[kind_name]
    opts, weights = sparse_adapter(kind_name, options, poison)
    small_checkpoint(tmp_path)
    save_adapter_dir(tmp_path / "adapter", "a", kind_name, opts, weights, {})   # replaces the LoRA one
    with pytest.raises(surgeon.SpecError, match=rf"module 'layers.0.proj': {message} \(the site maps 6 -> 8 features\)"):
        merge(tmp_path)
    assert_nothing_written(tmp_path)
    model = OneProjection()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = {"adapters": [{"name": "a", "from_dir": str(tmp_path / "adapter")}], "pipeline": ["insert"]}
    with pytest.raises(surgeon.SpecError, match=rf"adapters\[0\]\.from_dir.*module 'layers.0.proj': {message}"):
        surgeon.compile(model, (torch.randn(2, 6),), spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the user's model untouched
