"""Register surgeon's kernels as torch custom ops: `torch.ops.surgeon.lora_linear`.

Registration happens when this module is imported (by the lower pass), never at
`import surgeon`. The op has a fake implementation, so a lowered module still exports
(torch.export) and traces under torch.compile, and an autograd formula written with the
torch reference math (kernels/lora_linear.py, kernels/epilogue.py), so training through a
lowered module gives the gradients of the unlowered graph. Which implementation runs is
decided per call (kernels/dispatch.py: `backend`, re-exported here).
"""
from __future__ import annotations

import torch

from . import program_epilogue
from .dispatch import backend, on_device, runs_kernel, triton_available  # noqa: F401 - re-exported
from .epilogue import RULES, apply, as_tiles, operand_of, prologue, steps
from .lora_linear import compute_dtype, lora_linear as launch_lora_linear, pre_epilogue, reference, split_operands
from .pointwise_program import Program


@torch.library.custom_op("surgeon::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                lora_b: torch.Tensor | None, operands: list[torch.Tensor], scale: float, weight_layout: str,
                epilogue: str, program: str) -> torch.Tensor:
    """epilogue(x @ W^T + s * (x @ A^T) @ B^T): the fused LoRA linear (see kernels/lora_linear.py).

    `program` is "" or an encoded pointwise Program ending the epilogue (kernels/program_epilogue.py).
    It has no default: autograd's check wants backward's outputs to match the arguments as passed.
    """
    if not runs_kernel("lora_linear", x.device, {x.dtype}):
        return reference(x, weight, bias, lora_a, lora_b, operands, scale, weight_layout, epilogue, program)
    with on_device(x.device):
        return launch_lora_linear(x, weight, bias, lora_a, lora_b, operands, scale, weight_layout, epilogue,
                                  program=program)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, operands, scale, weight_layout, epilogue, program):
    out_features = weight.shape[0] if weight_layout == "out_in" else weight.shape[1]
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, operands, scale, weight_layout, epilogue, program = inputs
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, *operands)
    ctx.meta = (scale, weight_layout, epilogue, program)
    ctx.wants = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
                 lora_a is not None and lora_a.requires_grad, lora_b is not None and lora_b.requires_grad,
                 [o.requires_grad for o in operands])


def _backward(ctx, grad):
    x, weight, bias, lora_a, lora_b, *operands = ctx.saved_tensors
    scale, weight_layout, epilogue, program = ctx.meta
    grads = lora_linear_backward(grad, x, weight, bias, lora_a, lora_b, operands, scale, weight_layout,
                                 epilogue, ctx.wants, program)
    return (*grads, None, None, None, None)


lora_linear.register_autograd(_backward, setup_context=_setup_context)


def program_vjp(grad, z_out, extra: list, program: str) -> tuple:
    """(dL/d z_out, dL/d each extra input) through a program epilogue (identity when there is none)."""
    if not program:
        return grad, ()
    leaves = [z_out.detach().requires_grad_(), *(t.detach().requires_grad_() for t in extra)]
    with torch.enable_grad():
        out = program_epilogue.reference(leaves[0], leaves[1:], Program.decode(program))
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True)
    return (grads[0] if grads[0] is not None else torch.zeros_like(z_out)), grads[1:]


def lora_linear_backward(grad, x, weight, bias, lora_a, lora_b, operands, scale, weight_layout, epilogue,
                         wants, program: str = "") -> tuple:
    """Gradients of every tensor input (None where not wanted), from the torch reference math.

    With g = dL/dz (z before the epilogue), h = x @ A^T, LoRA-XS's R (m = h R^T; absent: m = h)
    and VeRA's vectors d (on m) and b (on the up-projection; absent means ones): g_u = s g b,
    g_m = (g_u B) d, g_h = g_m R, and
      dx = g W + g_h A,  dW = g^T x,  dA = g_h^T x,  dB = g_u^T (m d),  dR = g_m^T h,
      dd = sum over rows of (g_u B) m,  db = s sum over rows of g (m d) B^T,
    the bias and operand grads from each step's vjp. A program epilogue's gradients come from
    autograd through its torch reference. With an x gain l (x' = x * l feeds the GEMMs):
    dx = dx' * l and dl = sum over rows of dx' * x.
    """
    chain, where = steps(epilogue, bias is not None), prologue(epilogue)
    dtype = compute_dtype(x.dtype)
    vectors = {name: operands[i] for name, i in where.items()}
    x_in, gain = x, vectors.get("x_gain")
    x = x if gain is None else x * gain
    z, h = pre_epilogue(x, weight, lora_a, lora_b, scale, weight_layout, vectors)
    step_operands, extra = split_operands(chain, operands, program, where)
    tiles = as_tiles(chain, step_operands, z.shape)
    values = apply(z, chain, bias, tiles)
    g, extra_grads = program_vjp(grad.reshape(z.shape), values[-1].to(x.dtype), extra, program)
    g = g.to(dtype)
    operand_grads: list = [None] * len(step_operands) + list(extra_grads)
    bias_grad = None
    for step, value in zip(reversed(chain), reversed(values[:-1])):
        operand = operand_of(step, bias, tiles)
        g, g_operand = RULES[step.rule].vjp(g, value, operand.to(dtype) if torch.is_tensor(operand) else operand)
        if step.rule == "bias":
            bias_grad = g_operand
        elif g_operand is not None:
            prev = operand_grads[step.operand]
            operand_grads[step.operand] = g_operand if prev is None else prev + g_operand
    x2 = x.reshape(z.shape[0], -1).to(dtype)
    w = weight.to(dtype) if weight_layout == "out_in" else weight.to(dtype).t()
    want_x, want_w, want_bias, want_a, want_b, want_ops = wants
    g_h = da = db = None
    if lora_a is not None:
        vec = {k: v.to(dtype) for k, v in vectors.items()}
        middle = (h @ vec["xs_r"].t()).to(x.dtype).to(dtype) if "xs_r" in vec else h
        hidden = middle * vec["vera_d"] if "vera_d" in vec else middle
        g_u = scale * g * vec["vera_b"] if "vera_b" in vec else scale * g
        g_hidden = g_u @ lora_b.to(dtype)
        g_middle = g_hidden * vec["vera_d"] if "vera_d" in vec else g_hidden
        g_h = g_middle @ vec["xs_r"] if "xs_r" in vec else g_middle
        if "xs_r" in where:
            operand_grads[where["xs_r"]] = g_middle.t() @ h
        if "vera_d" in where:
            operand_grads[where["vera_d"]] = (g_hidden * middle).sum(0)
        if "vera_b" in where:
            operand_grads[where["vera_b"]] = (scale * g * (hidden @ lora_b.to(dtype).t())).sum(0)
        da = (g_h.t() @ x2).to(lora_a.dtype) if want_a else None
        db = (g_u.t() @ hidden).to(lora_b.dtype) if want_b else None
    dx = None
    if want_x or (gain is not None and want_ops[where["x_gain"]]):
        dx = g @ w if g_h is None else g @ w + g_h @ lora_a.to(dtype)
        if gain is not None:
            operand_grads[where["x_gain"]] = (dx * x_in.reshape(dx.shape).to(dtype)).sum(0)
            dx = dx * gain.to(dtype)
        dx = dx.to(x.dtype).reshape(x.shape) if want_x else None
    dw = None
    if want_w:
        dw = g.t() @ x2
        dw = (dw if weight_layout == "out_in" else dw.t()).to(weight.dtype)
    dbias = bias_grad.to(bias.dtype) if want_bias and bias_grad is not None else None
    dops = [gr.to(op.dtype).reshape(op.shape) if (want and gr is not None) else None
            for gr, op, want in zip(operand_grads, operands, want_ops)]
    return dx, dw, dbias, da, db, dops
