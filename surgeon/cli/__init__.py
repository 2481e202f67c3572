"""The command line: `surgeon demo`, `compile`, `generate`, `show`, `diff`, `merge-checkpoint`, `bench`.

views.py adds the graph-view options (show --dot/--svg/--html, diff); bench.py is `surgeon bench`.
The top layer: it may import anything in surgeon; nothing imports it.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

from .views import add_diff_command, add_view_options
from ..errors import SurgeonError
from ..safe_io import check_out_dir, real_dir, write_text_nofollow

DEMO_SPEC = """\
# The built-in demo: LoRA on every attention and MLP projection of a small LLaMA-style model.
adapters:
  - name: demo
    type: lora
    targets: ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
    rank: 8
    alpha: 16
pipeline:
  - insert
"""


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _import_factory(ref: str):
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise SurgeonError(f"--model must look like 'package.module:factory', got {ref!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise SurgeonError(f"--model {ref!r}: cannot import: {error}") from error
    except Exception as error:
        raise SurgeonError(f"--model {ref!r}: importing {module_name} raised {type(error).__name__}: {error}") \
            from error


def _call_factory(ref: str, factory):
    try:
        made = factory()
    except Exception as error:
        raise SurgeonError(f"model factory {ref} raised {type(error).__name__}: {error}") from error
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise SurgeonError(f"--model {ref!r}: the factory must return (model, example_inputs[, example_kwargs])")
    model, args, kwargs = (*made, None) if len(made) == 2 else made
    return model, args, kwargs


def cmd_compile(ns) -> int:
    import surgeon
    from ..compiled import load_spec

    if ns.model.startswith(HF_PREFIX):
        return _compile_pretrained(ns)
    for option, value in (("--merge-to", ns.merge_to), ("--example-shape", ns.example_shape),
                          ("--no-verify-merge", ns.no_verify_merge or None)):
        if value is not None:
            raise SurgeonError(f"{option} needs --model {HF_PREFIX}PATH (a checkpoint folder); a factory's model "
                               "is merged with the spec's `merge` pass and its own example inputs")
    if ns.out is None:
        raise SurgeonError("--out is required (only --model hf:PATH with --merge-to can do without it)")
    # everything that needs no model first: building it may load gigabytes of weights
    factory = _import_factory(ns.model)
    spec = load_spec(Path(ns.spec))
    check_out_dir(ns.out)
    model, args, kwargs = _call_factory(ns.model, factory)
    compiled = surgeon.compile(model, args, spec, kwargs, progress=_progress)
    print(compiled.report)
    out = compiled.save(ns.out)
    print(f"\nwrote {out}/: report.txt/json, spec.yaml, graph.py, graph.html, graph.dot, nodes*.json, groups.json, "
          "adapters/")
    return 0


HF_PREFIX = "hf:"


def _example_shape(text: str) -> tuple[int, int]:
    """`--example-shape 2x16` (or '2,16') -> (2, 16)."""
    words = text.lower().replace(",", "x").split("x")
    if len(words) != 2 or not all(w.strip().isdigit() and int(w) >= 1 for w in words):
        raise SurgeonError(f"--example-shape {text!r}: expected BATCHxLENGTH with sizes >= 1, e.g. 2x16")
    return int(words[0]), int(words[1])


def _compile_pretrained(ns) -> int:
    """`compile --model hf:PATH`: the folder's config.json built on the meta device, compiled structure only;
    with --merge-to, the merged checkpoint written in the folder's layout (surgeon.from_folder)."""
    from ..compiled import load_spec
    from ..from_folder import compile_pretrained

    path = ns.model[len(HF_PREFIX):]
    if not path:
        raise SurgeonError(f"--model {ns.model!r}: name the checkpoint folder after '{HF_PREFIX}', e.g. hf:./llama")
    if ns.out is None and ns.merge_to is None:
        raise SurgeonError("--out is required (or --merge-to, for the merged checkpoint only)")
    if ns.no_verify_merge and ns.merge_to is None:
        raise SurgeonError("--no-verify-merge needs --merge-to (it skips the check of the merged checkpoint)")
    example = _example_shape(ns.example_shape) if ns.example_shape is not None else None
    spec = load_spec(Path(ns.spec))
    if ns.out is not None:
        check_out_dir(ns.out)
    compiled = compile_pretrained(path, spec, example, merge_to=ns.merge_to, verify=not ns.no_verify_merge,
                                  progress=_progress)
    print(compiled.report)
    if compiled.merged_checkpoint is not None:
        summary = compiled.merged_checkpoint
        print(f"\nwrote {summary.out_dir}/ (merged checkpoint): {len(summary.shards)} shard file(s), "
              f"{len(summary.merged)} tensors merged, {summary.copied} copied, {summary.bytes_written:,} bytes")
        check = summary.verification
        print(f"checked against the folder with the adapters unmerged: {check}" if check is not None else
              "not checked (--no-verify-merge)")
    if ns.out is not None:
        out = compiled.save(ns.out)
        print(f"\nwrote {out}/: report.txt/json, spec.yaml, graph.py, graph.html, graph.dot, nodes*.json, "
              "groups.json, adapters/")
    return 0


def _prompt_ids(text: str) -> list[int]:
    """`--prompt-ids '1,2,3'` (or '1 2 3') -> [1, 2, 3]."""
    words = text.replace(",", " ").split()
    if not words or not all(w.lstrip("-").isdigit() for w in words):
        raise SurgeonError(f"--prompt-ids {text!r}: expected token ids separated by commas or spaces, e.g. '1,2,3'")
    ids = [int(w) for w in words]
    if any(i < 0 for i in ids):
        raise SurgeonError(f"--prompt-ids {text!r}: token ids are >= 0")
    return ids


def left_padded(prompts: list[list[int]], pad: int):
    """A batch of prompts of different lengths, left-padded as transformers' tokenizers pad for generation:
    (input_ids, attention_mask)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def print_generated(compiled, ids, mask, out) -> None:
    """One line per prompt (its tokens -> the new ones), then how the tokens were made and how fast."""
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].tolist()
        print(f"prompt {row}: {' '.join(map(str, prompt))} -> {' '.join(map(str, out[row, width:].tolist()))}")
    generator = compiled.generator
    timings = generator.timings
    built = f"graphs built in {timings['build_s']:.2f} s, " if "build_s" in timings else ""
    print(f"generate ({generator.mode}): {built}first token {1000 * timings.get('prefill_s', 0):.1f} ms, "
          f"then {1000 * timings.get('per_token_s', 0):.2f} ms per token")
    for note in generator.notes:
        print(f"  note: {note}")


def cmd_generate(ns) -> int:
    import torch

    import surgeon
    from ..compiled import load_spec

    if ns.model.startswith(HF_PREFIX):
        raise SurgeonError(f"generate --model {ns.model!r}: a checkpoint folder is compiled structure only (meta "
                           "weights), which cannot generate; give a factory that loads the model's weights")
    factory = _import_factory(ns.model)   # everything that needs no model first
    spec = load_spec(Path(ns.spec))
    prompts = [_prompt_ids(text) for text in ns.prompt_ids or []]
    if ns.max_new_tokens < 0:
        raise SurgeonError(f"--max-new-tokens must be >= 0, got {ns.max_new_tokens}")
    model, args, kwargs = _call_factory(ns.model, factory)
    compiled = surgeon.compile(model, args, spec, kwargs, progress=_progress)
    if compiled.generator is None:
        raise SurgeonError(f"{type(model).__name__} does not generate (surgeon generates with causal language "
                           "models: integer token ids in, logits out)")
    if not prompts:   # the example's input ids
        from ..generate import example_ids

        example = example_ids(compiled.module)
        if example is None:
            raise SurgeonError("give --prompt-ids: the factory's example has no input ids")
        prompts = example.tolist()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:   # a model without a config: its (first) token embedding's size
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if vocab is not None and any(i >= vocab for p in prompts for i in p):
        raise SurgeonError(f"--prompt-ids: token ids must be < the vocabulary size {vocab}")
    pad = ns.pad_token_id if ns.pad_token_id is not None else 0
    ids, mask = left_padded(prompts, pad)
    options = {k: v for k, v in (("temperature", ns.temperature), ("top_k", ns.top_k), ("top_p", ns.top_p),
                                 ("eos_token_id", ns.eos_token_id), ("pad_token_id", ns.pad_token_id))
               if v is not None}
    generator = torch.Generator().manual_seed(ns.seed) if ns.seed is not None else None
    _progress(f"generating {ns.max_new_tokens} tokens for {len(prompts)} prompt(s)")
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=ns.max_new_tokens, do_sample=ns.do_sample,
                            generator=generator, **options)
    print_generated(compiled, ids, mask, out)
    return 0


def cmd_demo(ns) -> int:
    import torch

    import surgeon
    from ..models import tiny_llama

    out = check_out_dir(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_nofollow(out / "demo_spec.yaml", DEMO_SPEC)
    model, (ids,) = tiny_llama(seed=0)
    compiled = surgeon.compile(model, (ids,), out / "demo_spec.yaml", progress=_progress)
    # a few steps of next-token training on a fixed toy batch: only the adapter learns
    trainable = [p for p in compiled.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    targets = torch.roll(ids, -1, dims=1)
    losses = []
    for _ in range(ns.steps):
        logits = compiled.module(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    _progress(f"trained {len(trainable)} adapter tensors for {ns.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    prompts = [ids[0, :6].tolist(), ids[1, :4].tolist()]   # two prompts of different lengths, from the toy batch
    prompt_ids, prompt_mask = left_padded(prompts, 0)
    generated = compiled.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=8)
    compiled.save_adapter("demo", real_dir(out / "adapter"))
    compiled.save_adapter("demo", real_dir(out / "adapter_peft"), format="peft")
    lowered = _demo_lowered(model, ids, compiled, out)
    compiled.apply(["merge"], progress=_progress)
    print(compiled.report)
    print(f"\ntraining loss {losses[0]:.4f} -> {losses[-1]:.4f} over {ns.steps} steps (adapter only)")
    print("\ngenerated with the trained adapter (greedy, 8 new tokens):")
    print_generated(compiled, prompt_ids, prompt_mask, generated)
    compiled.save(out)
    print(f"\nserving copy (unmerged, fuse + lower): {lowered}")
    print(f"wrote {out}/: report.txt/json, spec.yaml, graph.py, graph.html, graph.dot, nodes*.json, groups.json, "
          "adapters/, adapter/ (surgeon format), adapter_peft/ (PEFT format), lowered/ (its kernels/ and graph)")
    return 0


def _demo_lowered(model, ids, trained, out: Path) -> str:
    """The trained, unmerged module again with its regions lowered to generated kernels; saved to out/lowered."""
    import torch

    import surgeon

    lowered = surgeon.compile(model, (ids,), out / "demo_spec.yaml")
    lowered.module.load_state_dict(trained.module.state_dict())
    lowered.apply(["fuse", "lower"], progress=_progress)
    with torch.no_grad():
        error = (lowered.module(ids) - trained.module(ids)).abs().max().item()
    lowered.save(real_dir(out / "lowered"))
    return f"{lowered.report.rows[-1].notes[0]}; max |lowered - trained| = {error:.1e}"


def cmd_show(ns) -> int:
    directory = Path(ns.dir)
    nodes_file = directory / "nodes.json"
    if not nodes_file.is_file():
        raise SurgeonError(f"'{directory}' is not a saved compile (no nodes.json); write one with surgeon compile --out")
    if getattr(ns, "kernels", False):
        sources = sorted((directory / "kernels").glob("*.py"))
        if not sources:
            raise SurgeonError(f"'{directory}' has no generated kernels (run the `fuse` and `lower` passes)")
        for source in sources:
            print(f"# ---- {source.stem}\n{source.read_text()}")
        return 0
    if getattr(ns, "groups", False):
        from ..groups import format_groups

        groups_file = directory / "groups.json"
        if not groups_file.is_file():
            raise SurgeonError(f"'{directory}' has no groups.json; recompile it with this version of surgeon")
        print(format_groups(json.loads(groups_file.read_text())))
        return 0
    nodes = json.loads(nodes_file.read_text())
    from ..report import table

    rows = [[n["path"] or "<root>", n["name"], n["op"], n["target"].replace("aten.", "").removesuffix(".default"),
             "x".join(map(str, n["shape"])) if n["shape"] is not None else "", n["dtype"] or "", n["pass"]]
            for n in nodes if fnmatch.fnmatchcase(n["path"], ns.filter) and n["op"] != "output"]
    print((directory / "report.txt").read_text() if (directory / "report.txt").is_file() else "")
    print(table(["module", "node", "op", "target", "shape", "dtype", "made by"], rows))
    return 0


def cmd_merge_checkpoint(ns) -> int:
    from ..merge_checkpoint import merge_checkpoint

    summary = merge_checkpoint(Path(ns.base), Path(ns.adapter), Path(ns.out), fan_in_fan_out=ns.fan_in_fan_out,
                               allow_nonfinite=ns.allow_nonfinite)
    print(f"wrote {summary.out_dir}/: {len(summary.shards)} shard file(s), {len(summary.merged)} tensors merged, "
          f"{summary.copied} copied, {summary.bytes_written:,} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure prints one line, `surgeon: error: ...`, and returns 2 (130 on
    Ctrl-C); `--traceback` (before or after the command) or SURGEON_DEBUG=1 also prints the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SURGEON_DEBUG", "") not in ("", "0")
    while argv[:1] == ["--traceback"]:
        argv, debug = argv[1:], True
    try:
        if argv[:1] == ["bench"]:   # its own options (surgeon.bench)
            from .bench import main as bench_main

            return bench_main(argv[1:])
        ns = _parser().parse_args(argv)
        debug = debug or ns.traceback
        return ns.fn(ns)
    except KeyboardInterrupt:
        return _fail("interrupted", debug, 130)
    except SurgeonError as error:
        return _fail(str(error), debug)
    except Exception as error:
        return _fail(f"{type(error).__name__}: {error}", debug)


def _fail(message: str, debug: bool, status: int = 2) -> int:
    if debug:
        traceback.print_exc()
    print("surgeon: error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()),
          file=sys.stderr)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon", description="A model-surgery compiler over FX graphs.",
                                     epilog="Errors print one line, `surgeon: error: ...`, and exit with status 2.")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, also print the full traceback (or set SURGEON_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    out_help = ("folder for the artifacts{}; a symlink at a name surgeon writes there is replaced, "
                "never written through")
    p = sub.add_parser("demo", help="compile, train and merge a LoRA on the built-in LLaMA-style model")
    p.add_argument("--out", default="demo_out", help=out_help.format(" (default: demo_out)"))
    p.add_argument("--steps", type=int, default=20, help="training steps before the merge (default: 20)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("compile", help="compile a model from a factory, or from a checkpoint folder, with a spec")
    p.add_argument("--model", required=True,
                   help="package.module:factory returning (model, example_inputs[, kwargs]); or hf:PATH, a "
                        "checkpoint folder: its config.json is built on the meta device and compiled structure "
                        "only, no weight read")
    p.add_argument("--spec", required=True, help="spec file (.yaml or .toml); checked before the factory runs")
    p.add_argument("--out", help=out_help.format("") + "; required unless --merge-to is given")
    p.add_argument("--merge-to", metavar="DIR",
                   help="with --model hf:PATH: write the folder's checkpoint with the compile's adapters merged "
                        "into DIR (must not exist), tensor by tensor, in the folder's layout")
    p.add_argument("--example-shape", metavar="BxL",
                   help="with --model hf:PATH: the meta example input ids' shape (default: 2x16); with --merge-to "
                        "also the shape of the random ids the merged checkpoint is checked on")
    p.add_argument("--no-verify-merge", action="store_true",
                   help="with --merge-to: write the merged checkpoint without checking it layer by layer against "
                        "the folder with the adapters unmerged")
    p.set_defaults(fn=cmd_compile)
    p = sub.add_parser("generate", help="compile a causal LM from a factory with a spec and generate token ids")
    p.add_argument("--model", required=True, help="package.module:factory returning (model, example_inputs[, kwargs])")
    p.add_argument("--spec", required=True, help="spec file (.yaml or .toml); checked before the factory runs")
    p.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="one prompt's token ids, e.g. '1,2,3'; repeat for a batch (left-padded); "
                        "default: the factory's example input ids")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per prompt (default: 16)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's, else 1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: the model's, else 50)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the model's, else 1.0)")
    p.add_argument("--seed", type=int, help="seed of the sampling generator (default: torch's global RNG)")
    p.add_argument("--eos-token-id", type=int, help="stop a row at this token (default: the model's)")
    p.add_argument("--pad-token-id", type=int, help="pads prompts and finished rows (default: the model's, else 0)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("show", help="print a saved compile's report and graph, grouped by module path")
    p.add_argument("dir", help="a folder written by surgeon compile/demo")
    p.add_argument("--filter", default="*", help="module-path glob (default: all)")
    p.add_argument("--groups", action="store_true", help="print which weight axes are permuted together")
    p.add_argument("--kernels", action="store_true", help="print the generated kernel source of lowered regions")
    p.set_defaults(fn=cmd_show)
    add_view_options(p)
    add_diff_command(sub)
    sub.add_parser("bench", help="time merged/unmerged LoRA vs the eager base and PEFT (see surgeon bench -h)",
                   add_help=False)
    p = sub.add_parser("merge-checkpoint", help="merge an adapter into a safetensors checkpoint, tensor by tensor")
    p.add_argument("--base", required=True, help="folder with model.safetensors, or shards + model.safetensors.index.json")
    p.add_argument("--adapter", required=True, help="adapter folder: surgeon (save_adapter) or PEFT")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--fan-in-fan-out", action=argparse.BooleanOptionalAction, default=None,
                   help="square weights are stored in x out (GPT-2 Conv1D); default: from the adapter")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge even if the adapter holds NaN/inf or the merge overflows the dtype (refused by default)")
    p.set_defaults(fn=cmd_merge_checkpoint)
    for name, command in sub.choices.items():   # --traceback after the command too
        if name != "bench":
            command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                                 help="on an error, also print the full traceback")
    return parser


if __name__ == "__main__":
    sys.exit(main())
