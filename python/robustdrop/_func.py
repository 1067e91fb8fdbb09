"""torch.func's differentiating transforms (``grad``, ``vjp``, ``jacrev``, ...) of robustdrop's ops.

torch.func runs neither the compiled ops' autograd (a C++ ``torch::autograd::Function``)
nor the Triton ops' (``torch.library.register_autograd``): it needs an autograd.Function
with ``setup_context``. Every robustdrop op with a gradient is linear in its first input
x given what it saves, a bit-packed mask and a scale: ``dx = adjoint(dy, *saved)``, where
the adjoint op is itself linear and self-adjoint in its first input with the same saved
tensors (block_mask_backward, channel_mask_backward, fixed_mask_apply). Under a
torch.func transform the op therefore runs through ``LinearInFirstInput``, whose backward
calls the adjoint through the same Function: every order of derivative is the adjoint
again, as in the ops' own autograd. ``generate_vmap_rule`` lets ``vmap`` (per-sample
gradients, ``jacrev``) batch the forward and backward through the ops' vmap rules
(robustdrop._vmap).
"""
import torch

from robustdrop import _checks

__all__ = ["add_to_state", "linear_call"]

_TRANSFORM_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode)
                   | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerBackMode))


class LinearInFirstInput(torch.autograd.Function):
    """y = op(x, *rest), linear in x; the gradient of x is adjoint(dy, *saved).

    saves_outputs: the op returns (y, *saved), as the mask forward ops return
    (y, mask, scale); otherwise the op returns y alone and saved is rest, as for
    a self-adjoint op (mask, scale) or (mask,). Only x gets a gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(op, adjoint, saves_outputs, *args):
        # This Function is the autograd: the op's own autograd kernel, which torch.func cannot run, is skipped.
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, adjoint, saves_outputs, *args = inputs
        saved = tuple(output[1:]) if saves_outputs else tuple(args[1:])
        ctx.adjoint = adjoint
        ctx.num_saved_outputs = len(saved) if saves_outputs else 0
        ctx.num_args = len(args)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        if saves_outputs:
            ctx.mark_non_differentiable(*saved)

    @staticmethod
    def backward(ctx, grad_y, *grad_saved):
        grad_x = linear_call(ctx.adjoint, ctx.adjoint, False, grad_y, *ctx.saved_tensors)
        return (None, None, None, grad_x) + (None,) * (ctx.num_args - 1)

    @staticmethod
    def jvp(ctx, op_tangent, adjoint_tangent, flag_tangent, x_tangent, *rest_tangents):
        # y = M x with M diagonal (keep * scale), so M's transpose is M: the tangent is the adjoint's too.
        y_tangent = linear_call(ctx.adjoint, ctx.adjoint, False, x_tangent, *ctx.saved_tensors)
        if ctx.num_saved_outputs == 0:
            return y_tangent
        return (y_tangent,) + (None,) * ctx.num_saved_outputs


def linear_call(op, adjoint, saves_outputs: bool, *args):
    """``op(*args)`` with the autograd of ``LinearInFirstInput``."""
    return LinearInFirstInput.apply(op, adjoint, saves_outputs, *args)


def add_to_state(state: torch.Tensor, value) -> None:
    """``state += value`` without autograd, for a layer's own counter (CamDrop2d's ``num_steps``).

    Inside a torch.func transform a layer's buffer is a tensor the transform did
    not wrap (captured, not an input), which torch.func refuses to write: the
    write then runs below the transforms, once per call of the transformed
    function, as in eager mode. A buffer handed in as an input (``functional_call``)
    is wrapped and written as any other input.
    """
    with torch.no_grad():
        if _checks.in_func_transform() and not torch._C._functorch.is_functorch_wrapped_tensor(state):
            with torch._C._ExcludeDispatchKeyGuard(_TRANSFORM_KEYS):
                state.add_(value)
        else:
            state.add_(value)
