"""Fused LoRA linear: one Triton kernel for a base GEMM, its unmerged LoRA branch and an epilogue.

Math (shapes: x [M, K], W [N, K], A [R, K], B [N, R], s a float; M = product of x's leading
dims):

    z   = x @ W^T + s * (x @ A^T) @ B^T
    out = epilogue(z)          e.g. mul(silu(z + bias), gate) + residual

Each program owns a BLOCK_M x BLOCK_N tile of out. Its K loop loads the x tile once and feeds
two dots: x @ W^T into the fp32 accumulator and x @ A^T into a BLOCK_M x BLOCK_R one (R is
padded to BLOCK_R >= 16 with masked zeros, which tl.dot needs). After the loop, x @ A^T is
rounded to the input dtype (as the unfused graph stores it) and multiplied by B^T into the
accumulator itself, as s * (acc / s + h @ B^T), so that one fp32 tile is live, not two (a
scale outside 2^-24..2^24, 0 among them, runs the cuBLAS composition); the epilogue steps
(kernels/epilogue.py) run on the fp32 values and the tile is stored once. W is read through its strides, so GPT-2 Conv1D's in x out weight
(weight_layout="in_out") needs no copy. x @ A^T is recomputed by every column tile: extra
work R / BLOCK_N of the base GEMM.

The source is generated in kernels/lora_linear_source.py (template, snippets, `render`), the torch
reference is kernels/lora_linear_reference.py, the cuBLAS compositions kernels/lora_linear_cublas.py
and the argument checks kernels/lora_linear_checks.py; this file holds the launcher (strategy
choice, launch) and the GPU tuner. What a call decides
from its arguments' metadata (checks, step list, strategy) is kept per metadata key as a plan, so a
repeated call (a decode step) only builds its views and launches.
On a GPU the launcher times, once per shape bucket, the kernel with x @ A^T in its K loop, with
x @ A^T computed first, both with TMA loads on sm_90+, both with the K loop split over SPLIT_K
programs per tile (for M <= 64, decode shapes, where M x N alone makes too few tiles; the last
program of a tile sums the slices' fp32 partials in a fixed order and runs the epilogue), for
M > 64 the fused kernel in row-stationary order ("fused+rows": a program per row tile and chunk of
column tiles, x @ A^T computed in the chunk's first tile and reused), and the cuBLAS compositions,
and keeps the fastest of those whose output agrees with the torch reference's.

Shapes never appear in generated source: sizes and strides are runtime arguments, so dynamic
(symbolic) batch and sequence dims need no symbolic index algebra here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from . import codegen, epilogue_pass, program_epilogue, tuning
from .dispatch import planned, split_workspace
from .epilogue import RULES, Step, as_tiles, prologue, steps
from .lora_linear_checks import check as _check, tma_ready
from .lora_linear_cublas import cublas as _cublas
from .lora_linear_reference import compute_dtype, parse_program, pre_epilogue, reference, split_operands  # noqa: F401
from .lora_linear_source import MODES, VECTORS, load_kernel, operand_name, operand_names, render, split_mode
from .pointwise_program import Program

__all__ = ["GPU_CONFIGS", "MODES", "SPLITK_CONFIGS", "lora_linear", "load_kernel", "plan_key", "reference", "render",
           "tma_ready"]


# tile configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tried on a GPU, by M;
# decode shapes (M <= 16) want many narrow column tiles to spread W's bytes over the SMs
GPU_CONFIGS = {
    16: [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 256, 1, 4, 3), (16, 128, 64, 1, 4, 4),
         (16, 16, 256, 1, 2, 4), (16, 32, 256, 1, 4, 4), (16, 32, 512, 1, 4, 3), (16, 16, 512, 1, 4, 3)],
    64: [(32, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 32, 8, 4, 4), (32, 128, 64, 8, 4, 4),
         (64, 64, 128, 8, 4, 4), (32, 32, 256, 8, 4, 4)],
    None: [(128, 128, 32, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
           (128, 256, 32, 8, 8, 3), (64, 256, 32, 8, 4, 4), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
           (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 5), (128, 128, 128, 8, 8, 3)],
}
# "+splitk" configs, the last entry SPLIT_K: for M <= 64 the row tiles are one or two, so the column
# tiles alone give too few programs; cutting K over SPLIT_K programs per tile gives the SMs enough, and
# wide column tiles re-read A (R x K, fused mode) fewer times: A's extra bytes are R / BLOCK_N of W's
SPLITK_CONFIGS = {
    16: [(16, 64, 128, 1, 4, 4, 4), (16, 128, 128, 1, 4, 4, 4), (16, 128, 128, 1, 4, 4, 8),
         (16, 256, 64, 1, 4, 4, 8), (16, 128, 64, 1, 4, 4, 16), (16, 64, 256, 1, 4, 3, 8)],
    64: [(64, 64, 64, 1, 4, 4, 4), (32, 128, 64, 1, 4, 4, 4), (64, 128, 64, 1, 4, 3, 8), (32, 64, 128, 1, 4, 4, 8)],
}
# under TRITON_INTERPRET=1 each program instance runs as Python over numpy: few, wide tiles
INTERPRET_CONFIG = (32, 32, 32, 4, 1, 1)
INTERPRET_SPLITK_CONFIG = (*INTERPRET_CONFIG, 2)
# no generated kernel: cuBLAS's GEMM then addmm's accumulate of the LoRA term, or the LoRA term
# first with the GEMM adding it in its epilogue (see kernels/lora_linear_cublas.py)
CUBLAS_MODES = ("cublas", "cublas+beta")


# ---------------------------------------------------------------- launcher

# what a call decides from its arguments' metadata alone (shapes, strides, dtypes, devices, flags and
# strings), kept per such key: a repeated call (each decode step of a served model) rebuilds only its
# views and launches. Emptied when it reaches PLAN_LIMIT entries (a new prompt length is a new key).
_PLANS: dict[tuple, "_Plan"] = {}
PLAN_LIMIT = 4096


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                lora_b: torch.Tensor | None, operands: list[torch.Tensor], scale: float,
                weight_layout: str = "out_in", epilogue: str = "", config: tuple | None = None,
                mode: str | None = None, program: str = "") -> torch.Tensor:
    """Run the region: check the arguments, then the generated kernel (or the cuBLAS composition).

    With lora_a = lora_b = None the region has no LoRA branch (an IA3-scaled linear): the
    template is generated without the x @ A^T dot. `mode` (see MODES) and `config` force a
    strategy and a tile config; by default the interpreter runs "fused" (or "none") and a GPU
    the fastest (mode, config) measured for this shape bucket. `program` (an encoded pointwise
    Program) ends the epilogue; its inputs after %0 are the operands after the steps' own.
    """
    key = plan_key(x, weight, bias, lora_a, lora_b, operands, weight_layout, epilogue, config, mode, program)
    plan = planned(_PLANS, key, lambda: _Plan.make(x, weight, bias, lora_a, lora_b, operands, weight_layout,
                                                   epilogue, config, mode, program), PLAN_LIMIT)
    return plan.run(x, weight, bias, lora_a, lora_b, operands, scale)


def _meta(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def plan_key(x, weight, bias, lora_a, lora_b, operands, weight_layout, epilogue, config, mode, program) -> tuple:
    """Everything a call's checks and choices read: two calls with equal keys decide alike. TMA also
    needs 16-byte aligned base addresses, so where it may run the key holds whether they are."""
    tunes = _tunes(x)
    tma = (mode is None and tunes or (mode or "").endswith("+tma")) and \
        all(t.data_ptr() % 16 == 0 for t in (x, weight, lora_a) if t is not None)
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return (epilogue, program, weight_layout, config, mode, codegen.interpreting(), tunes, tma, tf32, _meta(x),
            _meta(weight), _meta(bias), _meta(lora_a), _meta(lora_b), tuple(map(_meta, operands)))


@dataclass(frozen=True)
class _Plan:
    """One call's metadata-only decisions: the step list, the sizes, the strategy (or, on a GPU, the
    tuning key its strategy is looked up by: the tuner's table stays the one place a choice is kept)."""

    epilogue: str
    program_text: str
    chain: tuple[Step, ...]
    where: dict                  # prologue vector name -> operand index
    n_steps: int                 # operands[:n_steps] are the steps' and vectors', the rest the program's
    sizes: tuple[int, int, int, int]
    program: Program | None
    input_kinds: tuple[str, ...]
    weight_layout: str
    block_r: int
    precision: str
    choice: tuple | None         # (mode, config) when fixed; None: tuned per bucket on the GPU
    modes: tuple[str, ...]       # the tuner's candidate strategies
    tune_key: tuple
    bucket: tuple
    kernels: dict = field(default_factory=dict)      # mode -> loaded kernel, filled by run

    @staticmethod
    def make(x, weight, bias, lora_a, lora_b, operands, weight_layout, epilogue, config, mode, program) -> "_Plan":
        """Check the arguments and decide what does not depend on their values (ValueError when wrong)."""
        chain, where = steps(epilogue, bias is not None), prologue(epilogue)
        step_operands, extra_inputs = split_operands(chain, operands, program, where)
        M, N, K, R = _check(x, weight, bias, lora_a, lora_b, step_operands, weight_layout, chain, where)
        parsed = parse_program(program, extra_inputs, M, N)
        input_kinds = () if parsed is None else program_epilogue.kinds(extra_inputs, M, N)
        kernels = ("none",) if lora_a is None else ("fused", "precomputed")
        tma = (mode is None and _tunes(x) or (mode or "").endswith("+tma")) and \
            tma_ready(x.reshape(M, K), weight, lora_a, weight_layout)
        rows = lora_a is not None and not {"vera_d", "xs_r"} & set(where)   # "+rows" keeps x @ A^T as computed
        _check_mode(mode, kernels, tma, lora_a is None, rows)
        choice, modes = None, [mode] if mode else [
            *kernels, *([f"{k}+tma" for k in kernels] if tma and _has_tma(x.device) else []),
            *([f"{k}+splitk" for k in kernels] if M <= max(SPLITK_CONFIGS) else []),
            *(["fused+rows"] if rows and M > max(SPLITK_CONFIGS) else []),
            *(["cublas"] if lora_a is None else CUBLAS_MODES)]
        if mode in CUBLAS_MODES or config is not None or not _tunes(x):
            variant = mode or kernels[0]
            choice = (variant, config or (INTERPRET_SPLITK_CONFIG if variant.endswith("+splitk") else INTERPRET_CONFIG))
        precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
        tune_key = (M, N, K, R, x.dtype, epilogue, bias is None, str(x.device), program, input_kinds)
        return _Plan(epilogue, program, chain, where, len(step_operands), (M, N, K, R), parsed, input_kinds,
                     weight_layout, max(16, triton_next_pow2(R)), precision, choice, tuple(modes), tune_key,
                     _bucket(tune_key, modes))

    def run(self, x, weight, bias, lora_a, lora_b, operands, scale) -> torch.Tensor:
        """The region's output for this call's tensors."""
        M, N = self.sizes[:2]
        if M == 0 or N == 0:
            return x.new_empty((*x.shape[:-1], N))
        call = (x, weight, bias, lora_a, lora_b, operands, scale)
        if self.sizes[2] == 0 or lora_a is not None and "vera_b" not in self.where and not invertible(scale):
            variant, cfg = "cublas", None     # torch's empty K sum; a scale the kernels cannot divide by
        else:                                 # (tuning never sees such a call: it would time cuBLAS as a kernel)
            variant, cfg = self.choice or _BEST.get(self.bucket) or self.tune(*call)
        kernel = self.kernels.get(variant)
        if kernel is None and not variant.startswith("cublas"):
            kernel = self.kernels[variant] = load_kernel(self.chain, variant, self.program, self.input_kinds,
                                                         tuple(self.where))
        return self.launch(*call, variant, cfg, kernel).reshape(*x.shape[:-1], N)

    def launch(self, x, weight, bias, lora_a, lora_b, operands, scale, variant: str, cfg: tuple | None,
               kernel=None) -> torch.Tensor:
        """One strategy's (M, N) output (`kernel`: the generated kernel when already loaded)."""
        M, N, K, R = self.sizes
        x2, chain = x.reshape(M, K), self.chain
        step_operands, extra_inputs = operands[:self.n_steps], operands[self.n_steps:]
        vectors = {name: step_operands[i] for name, i in self.where.items()}
        gain = vectors.get("x_gain")
        tiles = as_tiles(chain, step_operands, (M, N))
        if variant.startswith("cublas"):
            z, rest = _cublas(x2 if gain is None else x2 * gain, weight, bias, lora_a, lora_b, scale,
                              self.weight_layout, chain, vectors, lora_first=variant == "cublas+beta")
            tensors, strides = _epilogue_arguments(rest, bias, tiles, {}, self.program, extra_inputs,
                                                   self.input_kinds, M, N)
            return epilogue_pass.run(z, rest, bias, tiles, tensors, strides, self.program, extra_inputs,
                                     self.input_kinds)
        # "precomputed": h = round(x @ A^T) (M x R) in A's slot; "none": the pointers are never read
        lora_mode, suffix = split_mode(variant)
        a = lora_a if lora_mode == "fused" else \
            ((x2 if gain is None else x2 * gain) @ lora_a.t()) if lora_mode == "precomputed" else x2
        b = x2 if lora_mode == "none" else lora_b
        if suffix == "tma":
            _tma_scratch(x2.device)
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        split = list(_split_buffers(x2.device, M, N, cfg, self.block_r)) if suffix == "splitk" else []
        extra, extra_strides = _epilogue_arguments(chain, bias, tiles, vectors, self.program, extra_inputs,
                                                   self.input_kinds, M, N)
        w_strides = weight.stride() if self.weight_layout == "out_in" else weight.stride()[::-1]
        chunks = column_chunks(x2.device, M, N, cfg) if suffix == "rows" else 0
        args = [x2, weight, a, b, out, *split, *extra, M, N, K, R, *x2.stride(), *w_strides, *a.stride(),
                *b.stride(), *out.stride(), *extra_strides, float(scale), *([chunks] if chunks else [])]
        kernel = kernel or load_kernel(chain, variant, self.program, self.input_kinds, tuple(vectors))
        _launch(kernel, args, M, N, cfg, self.block_r, self.precision,
                (triton_cdiv(M, cfg[0]) * chunks,) if chunks else None)
        return out

    def tune(self, x, weight, bias, lora_a, lora_b, operands, scale) -> tuple[str, tuple]:
        """The fastest (mode, config) of this bucket whose output agrees with the torch reference's."""
        M, N = self.sizes[:2]
        call = (x, weight, bias, lora_a, lora_b, operands, scale)
        expected = []

        def agrees(candidate) -> bool:    # a candidate that launches but computes something else is not a choice
            expected[:] = expected or [reference(*call, self.weight_layout, self.epilogue,
                                                 self.program_text).reshape(M, N)]
            if candidate[0].endswith("+splitk"):    # NaN slots: a partial read before it is written shows
                # (only the workspace this launch uses: others may be in use on other streams)
                _split_buffers(x.device, M, N, candidate[1], self.block_r)[0].fill_(float("nan"))
            return tuning.agrees(self.launch(*call, *candidate), expected[0])

        return _tuned(lambda *candidate: self.launch(*call, *candidate), list(self.modes), self.tune_key, agrees,
                      lambda: tuning.capture_reason(x))


def invertible(scale: float) -> bool:
    """Whether the kernels may compute s * (acc / s + h @ B^T): 2^-24 <= |s| <= 2^24, so that acc / s
    overflows fp32 only where |acc| > 2^104 and turns subnormal only where |acc| < 2^-102. Another
    scale (0 among them) runs the cuBLAS composition instead."""
    return 2.0 ** -24 <= abs(scale) <= 2.0 ** 24


def _tunes(x: torch.Tensor) -> bool:
    """Whether this call chooses its strategy by measurement: compiled kernels on a GPU."""
    return x.is_cuda and not codegen.interpreting()


def _has_tma(device: torch.device) -> bool:
    """Whether the GPU has TMA (sm_90+)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def _check_mode(mode: str | None, kernels: tuple[str, ...], tma: bool, no_lora: bool, rows: bool) -> None:
    if mode in (None, *CUBLAS_MODES, *kernels, *(f"{k}+splitk" for k in kernels)) or \
            mode in (f"{k}+tma" for k in kernels) and tma or mode == "fused+rows" and rows:
        return
    raise ValueError(f"lora_linear: mode {mode!r} with {'no ' if no_lora else ''}LoRA tensors"
                     f"{'' if tma else ' and tensors TMA cannot read'}; modes are {MODES}, a kernel mode with "
                     f"'+splitk', or with '+tma' where rows are contiguous and 16-byte aligned ('none' exactly "
                     f"when lora_a is None), and 'fused+rows' (LoRA without VeRA's d or LoRA-XS's R)")


def column_chunks(device: torch.device, M: int, N: int, cfg: tuple) -> int:
    """How many programs share a row tile's column tiles in "+rows": enough that the SMs each get one
    (the row tiles alone may be fewer), as few as that allows (each recomputes x @ A^T once), and
    no chunk left empty. Two under the interpreter (tests see several chunks and several tiles each)."""
    tiles_m, tiles_n = triton_cdiv(M, cfg[0]), triton_cdiv(N, cfg[1])
    sms = _sm_count(device.index or 0) if device.type == "cuda" and not codegen.interpreting() else 2
    per_chunk = triton_cdiv(tiles_n, max(1, min(tiles_n, triton_cdiv(sms, tiles_m))))
    return triton_cdiv(tiles_n, per_chunk)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_buffers(device: torch.device, M: int, N: int, cfg: tuple, block_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, counters) for a "+splitk" launch with tile config `cfg` (its last entry SPLIT_K)."""
    tiles = triton_cdiv(M, cfg[0]) * triton_cdiv(N, cfg[1])
    return split_workspace(device, tiles * cfg[6] * cfg[0] * (cfg[1] + block_r), tiles)


def _epilogue_arguments(chain, bias, tiles, vectors, program, program_inputs, input_kinds, M, N) -> tuple[list, list]:
    """The kernel's tensors after out, and their strides, in its signature's order: the steps'
    operands, the prologue vectors (VECTORS order), a program epilogue's inputs."""
    by_name = {"bias": bias, **{operand_name(s): tiles[s.operand] for s in chain
                                if RULES[s.rule].operand in ("tile", "vec")}}
    extra = [by_name[name] for name, _ in operand_names(chain)]
    strides = [st for t in extra for st in t.stride()]
    for name in (v for v in VECTORS if v in vectors):
        extra, strides = extra + [vectors[name]], strides + list(vectors[name].stride())
    if program is not None:
        more, more_strides = program_epilogue.launch_tensors(program_inputs, input_kinds, M, N)
        extra, strides = extra + more, strides + more_strides
    return extra, strides


_SCRATCH_SET: set[str] = set()


def _tma_scratch(device: torch.device) -> None:
    """Give Triton an allocator for the descriptors kernels build on the device (once per device type;
    "cuda" allocates on the current device, the one the kernel launches on)."""
    if device.type not in _SCRATCH_SET:
        import triton

        kind = device.type
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=kind))
        _SCRATCH_SET.add(kind)


def _launch(kernel, args: list, M: int, N: int, cfg: tuple, block_r: int, precision: str,
            grid: tuple | None = None) -> None:
    block_m, block_n, block_k, group_m, warps, stages = cfg[:6]
    grid = grid or (triton_cdiv(M, block_m) * triton_cdiv(N, block_n),) + tuple(cfg[6:])  # (tiles, SPLIT_K) split
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=group_m,
                DOT_PRECISION=precision, **({"SPLIT_K": cfg[6]} if len(cfg) > 6 else {}))
    if not codegen.interpreting():
        meta.update(num_warps=warps, num_stages=stages)
    kernel[grid](*args, **meta)


_BEST: dict[tuple, tuple[str, tuple]] = {}


def bucket_m(M: int) -> int:
    """The row count a tuning bucket stands for: 16 for up to 16 rows (one 16-row tile whatever M is,
    so every candidate runs the same grid: one choice serves them all), else M rounded up to a power
    of two, at most 4096."""
    return 16 if M <= 16 else min(triton_next_pow2(M), 4096)


def _bucket(key: tuple, modes) -> tuple:
    """The tuner's table key for a call keyed `key` (M first) choosing among `modes`."""
    return (bucket_m(key[0]),) + key[1:] + tuple(modes)


def _tuned(launch, modes: list[str], key: tuple, agrees=None, unmeasurable=None) -> tuple[str, tuple]:
    """The fastest (mode, tile config) for this shape bucket on the GPU (benchmarked once per bucket).

    Like triton.autotune, but keyed on `bucket_m(M)`: the token count changes on every call of a
    language model, and retuning for each exact M would stall it. A
    "precomputed" candidate is timed with its x @ A^T GEMM included, "cublas" as a whole.
    """
    import triton.testing

    M, bucket = key[0], _bucket(key, modes)
    limit = next(k for k in (16, 64, None) if k is None or M <= k)
    candidates = [(m, cfg) for m in modes for cfg in ([None] if m in CUBLAS_MODES else
                                                      SPLITK_CONFIGS[limit or 64] if m.endswith("+splitk") else
                                                      GPU_CONFIGS[limit])]
    return tuning.fastest(_BEST, "lora_linear", bucket, candidates,
                          lambda c: triton.testing.do_bench(lambda: launch(*c), warmup=5, rep=20), agrees,
                          unmeasurable)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
