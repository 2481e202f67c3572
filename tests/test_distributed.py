"""The compiled module trains under torch.distributed: DDP and FSDP2 (`fully_shard`), 2 CPU processes on gloo.

One spawn of two processes serves every test here (starting them, importing transformers and compiling cost
most of the time on a small machine). Each process compiles the same seeded model with the same LoRA spec
and trains its half of a fixed batch: first a DDP copy, then the compiled module itself under `fully_shard`.
The trained adapters, as the rank-0 process saves them with `save_adapter` (surgeon's format after DDP,
PEFT's after FSDP2), are compared with one process training the same compile on the whole batch.

Tolerance: the reference and the two ranks compute the same gradients as sums in another fp32 order (each
rank's 2-row matmuls and the average of the two ranks' gradients, against one 4-row matmul), so they differ by
float32 rounding, ~1e-7 of their size. The optimizer is SGD with momentum, linear in the gradients: over STEPS
steps each factor moves by lr * (a momentum-weighted sum of its gradients), at most ~0.15 here, so the rounding
moves it by ~1e-7 of that, ~2e-8 (plus what the slightly different weights change in the next steps' gradients,
of the same order). ATOL + RTOL * |value| (1e-6 + 1e-5 relative) allows over ten times that; measured: at most
3e-8 on LLaMA, 7.5e-9 on GPT-2. A rank that trained on its half alone (a missing gradient reduction), or no training,
is off by more than 100 * ATOL (measured: 0.05 and more), which the tests check too.
"""
from __future__ import annotations

import copy
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import surgeon
from surgeon.adapter_io import load_adapter_dir, load_peft_dir
from tests.conftest import hf_gpt2, hf_llama
from tests.timm_models import EXTRAS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without torch.distributed / gloo")

WORLD = 2
STEPS = 3
LR = 0.5
ATOL, RTOL = 1e-6, 1e-5
CASES = {   # name -> (factory, LoRA targets)
    "llama": (hf_llama, ["*.q_proj", "*.v_proj", "*.down_proj"]),
    "gpt2": (hf_gpt2, ["*.c_attn", "*.mlp.c_fc"]),   # GPT-2's Conv1D (x @ W, W stored in x out)
}
SPEC = {"rank": 4, "alpha": 8}
KW = {"use_cache": False}


def compile_case(name: str):
    factory, targets = CASES[name]
    model, _ = factory()
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (2 * WORLD, 9), generator=torch.Generator().manual_seed(5))   # a fixed batch
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": targets, **SPEC}]}
    return surgeon.compile(model, (batch[:2, :-1],), spec, KW), batch


def loss_of(module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, the mean over the rows' tokens (so two halves average to the whole)."""
    logits = module(batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train(module, batch: torch.Tensor) -> None:
    module.train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    for _ in range(STEPS):
        loss = loss_of(module, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def adapter_params(compiled) -> set[str]:
    return {t for s in compiled.adapters["a"].sites for t in s.params.values()}


# ---------------------------------------------------------------- the two processes

def _worker(rank: int, world: int, out: str) -> None:
    # spawn hands this process the parent's sys.path: after a timm test it holds timm's extras folder, whose
    # torchvision cannot load here and which transformers would import (tests/timm_models.py); no timm is needed
    sys.path[:] = [p for p in sys.path if Path(p) != EXTRAS]
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for name in CASES:
            folder = Path(out) / name
            record: dict = {}
            compiled, batch = compile_case(name)
            mine = batch[2 * rank:2 * rank + 2]   # this rank's half of the batch
            layered = copy.deepcopy(compiled.module)

            # DDP: a copy of the whole compile, wrapped; the Compiled keeps its own (unwrapped) module
            ddp = copy.deepcopy(compiled)
            wrapped = DistributedDataParallel(ddp.module)
            record["ddp_trainable"] = sorted(n for n, p in ddp.module.named_parameters() if p.requires_grad)
            train(wrapped, mine)
            torch.save({f"{path}.{p}": t for path, ps in ddp.adapter_weights("a").items() for p, t in ps.items()},
                       folder / f"ddp_rank{rank}.pt")
            if rank == 0:
                ddp.save_adapter("a", folder / "ddp")

            # FSDP2: fully_shard on the compiled module itself, one group holding every parameter
            fully_shard(compiled.module)
            module = compiled.module
            record["fsdp_is_fsdp_module"] = isinstance(module, FSDPModule)
            record["fsdp_all_dtensor"] = all(isinstance(p, DTensor) for p in module.parameters())
            record["fsdp_trainable"] = sorted(n for n, p in module.named_parameters() if p.requires_grad)
            try:   # sharded: save_adapter refuses, saying what to do
                compiled.save_adapter("a", folder / f"refused{rank}")
            except surgeon.SurgeonError as error:
                record["fsdp_sharded_save"] = str(error)
            record["fsdp_refused_wrote"] = (folder / f"refused{rank}").exists()
            train(module, mine)
            module.unshard()   # every rank: the full parameters (a collective), then rank 0 writes
            if rank == 0:
                compiled.save_adapter("a", folder / "fsdp_peft", format="peft")
            module.reshard()

            # FSDP2 per layer: the graph reads every parameter itself and never calls the layers, so their
            # pre-forward hooks (which gather each layer's shards) never run
            container = layered.get_submodule("model.layers" if name == "llama" else "transformer.h")
            for _, layer in container.named_children():
                fully_shard(layer)
            fully_shard(layered)
            try:
                loss_of(layered, mine)
            except RuntimeError as error:
                record["per_layer_error"] = str(error)
                record["per_layer_notes"] = list(getattr(error, "__notes__", []))
            (folder / f"record{rank}.json").write_text(json.dumps(record))
        dist.barrier()   # neither process leaves while the other may still talk to it
    except BaseException:
        (Path(out) / f"failed{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Spawn the two processes once; their folder (per case: saved adapters, records)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed")
    for name in CASES:
        (out / name).mkdir()
    context = mp.start_processes(_worker, args=(WORLD, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 600
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail("the distributed processes did not finish in 600 s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:   # raised, or died
        failures = "\n".join(p.read_text() for p in sorted(out.glob("failed*.txt")))
        pytest.fail(f"a distributed process failed: {error}\n{failures}")
    finally:
        for process in context.processes:   # only after a failure or the deadline: the ones started here
            if process.is_alive():
                process.kill()
    return out


@pytest.fixture(scope="module")
def reference():
    """Per case: the adapter after single-process training on the whole batch, and the one before training
    and after training on rank 0's half alone (what a broken gradient reduction would give)."""
    out = {}
    for name in CASES:
        compiled, batch = compile_case(name)
        initial = compiled.adapter_weights("a")
        initial = {path: {p: t.clone() for p, t in ps.items()} for path, ps in initial.items()}
        half = copy.deepcopy(compiled)
        train(compiled.module, batch)
        train(half.module, batch[:2])
        out[name] = {"whole": compiled.adapter_weights("a"), "initial": initial, "half": half.adapter_weights("a"),
                     "params": adapter_params(compiled)}
    return out


def record(runs: Path, name: str, rank: int) -> dict:
    return json.loads((runs / name / f"record{rank}.json").read_text())


def assert_matches(got: dict, reference: dict) -> None:
    """`got` equals the whole-batch training within the fp32 reduction-order tolerance, and differs from the
    untrained adapter and from training on one half alone by much more than that."""
    want = reference["whole"]
    assert sorted(got) == sorted(want)
    for path, params in want.items():
        assert sorted(got[path]) == sorted(params), path
        for param, tensor in params.items():
            torch.testing.assert_close(got[path][param], tensor, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{path}.{param}: {m}")
    for other in ("initial", "half"):
        gap = max((got[path][p] - t).abs().max().item() for path, ps in reference[other].items() for p, t in ps.items())
        assert gap > 100 * ATOL, f"{other}: {gap}"


# ---------------------------------------------------------------- DDP

@pytest.mark.parametrize("name", CASES)
def test_ddp_trains_the_adapter_as_one_process_does(runs, reference, name):
    for rank in range(WORLD):   # only the adapter's parameters train; the base is frozen on every rank
        assert set(record(runs, name, rank)["ddp_trainable"]) == reference[name]["params"]
    saved = load_adapter_dir(runs / name / "ddp")   # rank 0's save_adapter, surgeon's format
    assert_matches(saved.weights, reference[name])
    ranks = [torch.load(runs / name / f"ddp_rank{r}.pt") for r in range(WORLD)]
    for key, tensor in ranks[0].items():   # the replicas stay bit-identical (the same all-reduced gradients)
        assert torch.equal(ranks[1][key], tensor), key
        path, _, param = key.rpartition(".")
        assert torch.equal(saved.weights[path][param], tensor), key


# ---------------------------------------------------------------- FSDP2

@pytest.mark.parametrize("name", CASES)
def test_fsdp2_on_the_compiled_module_trains_the_adapter_as_one_process_does(runs, reference, name):
    for rank in range(WORLD):
        seen = record(runs, name, rank)
        assert seen["fsdp_is_fsdp_module"] and seen["fsdp_all_dtensor"]   # every parameter sharded
        assert set(seen["fsdp_trainable"]) == reference[name]["params"]  # base frozen, adapter trainable
    saved = load_peft_dir(runs / name / "fsdp_peft")   # rank 0's save_adapter(format="peft") after unshard()
    assert_matches(saved.weights, reference[name])


@pytest.mark.parametrize("name", CASES)
def test_save_adapter_refuses_sharded_parameters_and_writes_nothing(runs, name):
    for rank in range(WORLD):
        seen = record(runs, name, rank)
        message = seen.get("fsdp_sharded_save", "(no SurgeonError)")
        assert "sharded by FSDP" in message and "unshard()" in message, message
        assert not seen["fsdp_refused_wrote"]


@pytest.mark.parametrize("name", CASES)
def test_fsdp2_per_layer_fails_and_says_why(runs, name):
    """fully_shard on the layers of the compiled module cannot work: the flattened graph never calls them, so
    the layers' parameters reach their ops still sharded. torch's error is kept; surgeon's note says why."""
    for rank in range(WORLD):
        seen = record(runs, name, rank)
        assert "got mixed torch.Tensor and DTensor" in seen.get("per_layer_error", "(no RuntimeError)"), seen
        notes = " ".join(seen["per_layer_notes"])
        assert "fully_shard was applied to submodules of this compiled module" in notes, notes
        assert ("model.layers.0" if name == "llama" else "transformer.h.0") in notes, notes
