"""``torch.vmap`` of robustdrop's ops: each op runs once per vmapped call.

vmap over a model (``torch.func.stack_module_state`` ensembles) reaches the
ops with inputs that carry a vmapped dimension. The rule registered here takes
each call's slice of every vmapped input, runs the op on it and stacks the
outputs along a new leading dimension: exactly the loop
``torch.stack([op(*args_i) for i in range(B)])``. A drawn seed is an input like
any other (``_checks.values_are_traced``): with ``randomness="different"`` it
is vmapped, so every call draws its own masks; with ``"same"`` it is not, and
every call uses the one seed.

The ops' kernels take one batch of samples each, so a loop is what a batching
rule can do without a second code path per kernel; it replaces torch's own
fallback, which runs the same loop but warns at every call. The in-place ops
keep that fallback.
"""
import torch

__all__ = ["register_loop_rules"]


def _call_slice(args: tuple, in_dims: tuple, index: int) -> tuple:
    """The arguments of vmapped call ``index``: each vmapped tensor's slice, the rest as given."""
    return tuple(arg if dim is None else arg.select(dim, index) for arg, dim in zip(args, in_dims))


def _as_tuple(outputs) -> tuple:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _no_calls(op, args: tuple, in_dims: tuple) -> tuple:
    """The outputs of zero vmapped calls: empty tensors (0, *shape of one call's output), the shapes
    from the op's fake implementation on meta tensors shaped as one call's arguments. The floating
    ones are tied to the vmapped inputs by adding a zero, so autograd gives those inputs their
    (empty) gradients, as it would through a stack of calls."""
    def one_call_on_meta(arg, dim):
        if not isinstance(arg, torch.Tensor):
            return arg
        shape = arg.shape if dim is None else arg.shape[:dim] + arg.shape[dim + 1:]
        return torch.empty(shape, dtype=arg.dtype, device="meta")

    vmapped = [arg for arg, dim in zip(args, in_dims) if dim is not None]
    outputs = _as_tuple(op(*(one_call_on_meta(arg, dim) for arg, dim in zip(args, in_dims))))
    zero = sum(arg.sum() * 0 for arg in vmapped if arg.requires_grad)
    empty = [torch.empty((0,) + tuple(output.shape), dtype=output.dtype, device=vmapped[0].device)
             for output in outputs]
    return tuple(stacked + zero if stacked.is_floating_point() else stacked for stacked in empty)


def _loop_rule(op):
    single = len(op._schema.returns) == 1

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            outputs = _no_calls(op, args, in_dims)
        else:
            calls = [_as_tuple(op(*_call_slice(args, in_dims, index))) for index in range(info.batch_size)]
            outputs = tuple(torch.stack(parts) for parts in zip(*calls))
        return (outputs[0], 0) if single else (outputs, (0,) * len(outputs))

    return rule


def register_loop_rules() -> None:
    """The loop above as the vmap rule of every functional op of the robustdrop library registered
    so far (the compiled, Triton and ``_drawn_seed`` ops alike)."""
    for qualified_name in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualified_name.partition("::")
        if namespace != "robustdrop":
            continue
        op = getattr(torch.ops.robustdrop, name).default
        if not op._schema.is_mutable:
            torch.library.register_vmap(qualified_name, _loop_rule(op))
