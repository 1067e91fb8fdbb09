"""Argument checks shared by every op and backend: bad input is a ValueError or
TypeError that names the argument, before any kernel runs."""
import math
import numbers

import torch
from torch.utils.weak import WeakIdKeyDictionary

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Every argument check in robustdrop asks these. They run on every op call, so a
# plain int or float is answered without the numbers ABCs' isinstance (about 0.5 us
# each). bool is never a number here.
def is_real(value) -> bool:
    kind = type(value)
    return kind is float or kind is int or (kind is not bool and isinstance(value, numbers.Real))


def as_float(value) -> float:
    """A real number as a float: an int too large for one (``10**400``) becomes +-inf, which the range
    checks then refuse with their message naming the argument, where ``float`` would raise
    OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def real_number(value, name: str) -> float:
    """``value`` as a float (``as_float``) when it is a real number (not a bool); else a TypeError
    naming it. The range checks build on it."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return as_float(value)


def is_integral(value) -> bool:
    kind = type(value)
    return kind is int or (kind is not bool and isinstance(value, numbers.Integral))


def in_func_transform() -> bool:
    """Whether this code runs eagerly inside a torch.func transform (``vmap``, ``grad``, ...)."""
    # is_compiling first: Dynamo need not trace the functorch query.
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def in_differentiating_transform() -> bool:
    """Whether a torch.func transform that differentiates runs here: ``grad``, ``vjp``, ``jacrev``
    (reverse mode) or ``jvp``, ``jacfwd`` (forward mode), alone or inside ``vmap``."""
    if not in_func_transform():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(interpreter.key() in (TransformType.Grad, TransformType.Jvp)
               for interpreter in retrieve_all_functorch_interpreters())


def in_onnx_export() -> bool:
    """Whether torch.onnx.export is tracing this code. Its exporters trace through torch.export or the
    TorchScript tracer: those cheap queries come first, since ``torch.onnx.is_in_onnx_export`` costs
    about a microsecond, which every op call would pay."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


def values_are_traced() -> bool:
    """Whether tensors' values are out of Python's reach here: under torch.compile, where reading one
    breaks the graph, and under a torch.func transform, where a vmapped tensor holds one value per
    vmapped call. Checks that read values are skipped then, and random draws (seeds, Active
    DropBlock's policy) stay tensors."""
    return torch.compiler.is_compiling() or in_func_transform()


def check_philox_index(index: torch.Tensor) -> None:
    """The RNG ops' index: int64 (csrc/checks.h check_philox_args, for the compiled kernels)."""
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")


def check_feature_map(x, name: str = "x", ndim: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D (N, C, H, W), got {x.dim()} dimensions with shape {tuple(x.shape)}")


def check_probability(value, name: str = "p") -> float:
    number = real_number(value, name)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return number


def check_positive_int(value, name: str) -> int:
    return _check_int_at_least(value, name, 1)


def check_non_negative_int(value, name: str) -> int:
    return _check_int_at_least(value, name, 0)


def _check_int_at_least(value, name: str, minimum: int) -> int:
    if not is_integral(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_non_negative(value, name: str) -> float:
    """A finite real number >= 0 (NaN and Inf are refused: an infinite eps zeroes DropBlock's output)."""
    value = check_finite(value, name)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """A flag (training, inplace, rescale, ...): a Python bool and nothing else, as for torch's own
    bool arguments. A truthy string or int must not switch a flag on ("no" is truthy); a numpy bool
    is refused, as torch refuses it; a bool tensor's value cannot be read without a synchronisation
    (and, under torch.compile, a graph break). Under torch.compile a bool is a constant of the
    graph: this check adds nothing to it."""
    kind = type(value)
    if kind is not bool:
        # Qualified outside builtins: numpy's bool is named "bool" too.
        label = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{name} must be a bool (True or False), got {label}")
    return value


def check_choice(value, name: str, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_seed(seed, name: str = "seed") -> None:
    if seed is not None and not is_integral(seed) and not isinstance(seed, torch.SymInt):
        raise TypeError(f"{name} must be an int or None, got {type(seed).__name__}")


def check_classifier_weight(weight, channels: int, device, name: str = "weight") -> None:
    """A classifier weight (K, C') whose width C' is a multiple of the feature map's channels C."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (K, C'), the classifier's weight, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{name} must have at least one class (row), got shape {tuple(weight.shape)}")
    if weight.shape[1] < channels or weight.shape[1] % channels != 0:
        raise ValueError(f"{name} must have a width C' that is a multiple of x's channels C = {channels}, "
                         f"got C' = {weight.shape[1]}")
    if weight.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {weight.device}")


def check_target(target, batch: int | None, device, name: str = "target") -> None:
    """Class indices (N,) int64 on x's device (batch and device None: any length, any device)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long) class indices, got {target.dtype}")
    if target.dim() != 1 or (batch is not None and target.shape[0] != batch):
        expected = "(N,)" if batch is None else f"(N,) = ({batch},)"
        raise ValueError(f"{name} must have shape {expected}, one class index per sample, "
                         f"got {tuple(target.shape)}")
    if device is not None and target.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {target.device}")


def check_target_values(target: torch.Tensor, num_classes: int, name: str = "target") -> None:
    """Every index in [0, K). Reads the values (``value_range``): one synchronisation for a CUDA
    tensor, the first time it is checked. A meta tensor has no values to check (shapes only, as
    every op runs on meta tensors)."""
    if target.numel() == 0 or target.is_meta:
        return
    low, high = value_range(target)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name} must hold class indices in [0, K) = [0, {num_classes}), got {bad}")


# (min, max) of tensors off the CPU whose values were read: tensor -> (version, min, max). Reading a
# GPU tensor makes the host wait for every queued kernel; the targets that every CamDrop layer of a
# model checks at each forward, or the per-sample rates a layer passes at each, are read once.
_KNOWN_RANGES = WeakIdKeyDictionary()


def value_range(tensor: torch.Tensor) -> tuple:
    """(min, max) of a non-empty integer or floating-point tensor, as Python numbers (both NaN when
    it holds a NaN).

    A tensor off the CPU is read once while it lives and its version counter stays the same:
    every in-place op bumps it, through any view, so a changed tensor is read again. Writes the
    counter does not see (through ``.data``, or by other libraries via DLPack) are not, and
    reach the kernels unchecked; those stay memory-safe (CUDA and Triton clamp class indices,
    CUDA with a device assert). An inference tensor has no version counter and is read every time.
    """
    if _range_is_remembered(tensor):
        known = _KNOWN_RANGES.get(tensor)
        if known is not None and known[0] == tensor._version:
            return known[1], known[2]
    low, high = torch.stack(torch.aminmax(tensor.detach())).tolist()
    remember_value_range(tensor, low, high)
    return low, high


def remember_value_range(tensor: torch.Tensor, low, high) -> None:
    """Records (min, max) of ``tensor``, known without reading it (a device copy of a checked CPU
    tensor), so that ``value_range`` does not read it."""
    if _range_is_remembered(tensor):
        _KNOWN_RANGES[tensor] = (tensor._version, low, high)


def _range_is_remembered(tensor: torch.Tensor) -> bool:
    """Whether ``value_range`` keeps ``tensor``'s range: reading it would wait for a device, and it
    has a version counter to tell when it changes (an inference tensor has none)."""
    return _reading_waits_for_device(tensor) and not tensor.is_inference()


def _reading_waits_for_device(tensor: torch.Tensor) -> bool:
    """Whether reading ``tensor``'s values waits for a device (a CPU tensor is read at no such cost,
    and through numpy it may change without its version counter seeing)."""
    return tensor.device.type != "cpu"


def size_at_least(size, minimum: int):
    """max(minimum, size) for a size derived from a tensor's shape. A SymInt (torch.compile with dynamic
    shapes, torch.export) stays one through torch.sym_max; an int takes the builtin max, as torch 2.11's
    Dynamo cannot trace torch.sym_max on two ints (a graph break, an error with fullgraph)."""
    if isinstance(size, torch.SymInt):
        return torch.sym_max(minimum, size)
    return max(minimum, size)


def check_topk(value, name: str, size: int, what: str) -> int:
    """A count k with 1 <= k <= size. A SymInt, a default that follows symbolic sizes under
    torch.compile or torch.export, stays one (an int would fix the sizes), unchecked: the kernels check
    the count they receive, and a check here would be a guard the compiler cannot always prove."""
    if isinstance(value, torch.SymInt):
        return value
    value = check_positive_int(value, name)
    if value > size:
        raise ValueError(f"{name} must be <= {what} = {size}, got {value}")
    return value


NORMALIZE_MODES = ("batch", "none")


def check_block_drop_args(p, block_size, normalize, eps, seed,
                          normalize_modes: tuple = NORMALIZE_MODES) -> tuple[float, int, float]:
    """The arguments every block-dropping op shares: returns (p, block_size, eps) as float, int, float."""
    p = check_probability(p)
    block_size = check_positive_int(block_size, "block_size")
    check_choice(normalize, "normalize", normalize_modes)
    eps = check_non_negative(eps, "eps")
    check_seed(seed)
    return p, block_size, eps


MAX_DENSITY_CELLS = 1 << 16


def check_density_input(x, dims) -> int:
    """x (N, C, H, W) with dims in {1, 2, 3}, or x (N, F) with dims 1; returns dims as int."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    dims = check_dims(dims)
    if x.dim() not in (2, 4):
        raise ValueError(f"x must be 4-D (N, C, H, W) feature maps or 2-D (N, F) features, got {x.dim()} "
                         f"dimensions with shape {tuple(x.shape)}")
    if x.dim() == 2 and dims != 1:
        raise ValueError(f"dims must be 1 for 2-D (N, F) features (each value is its own coordinate), got {dims}")
    return dims


def check_dims(dims) -> int:
    """The principal axes of a density grid: an int in {1, 2, 3} (not True, not 2.0)."""
    if not is_integral(dims):
        raise TypeError(f"dims must be an int, got {type(dims).__name__}")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return int(dims)


def check_grids(grids, dims: int) -> int:
    """grids >= 1 with grids**dims cells at most MAX_DENSITY_CELLS."""
    grids = check_positive_int(grids, "grids")
    if grids**dims > MAX_DENSITY_CELLS:
        raise ValueError(f"grids must give at most {MAX_DENSITY_CELLS} cells (grids**dims), got {grids}**{dims}")
    return grids


def check_finite(value, name: str) -> float:
    number = real_number(value, name)
    if not abs(number) < float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def check_sample_rates(p, batch: int, device, name: str = "p") -> torch.Tensor:
    """Drop rates as a tensor: (N,) on x's device, one per sample, or 0-d on x's device or the CPU,
    one for every sample; in [0, 1]. Returned as float64, of p's shape and on p's device.

    Reads the values (``value_range``): one synchronisation for a CUDA tensor, the first time
    it is checked. Not under torch.compile, where reading them would end the graph (as CamDrop's
    target values in the op, they are then unchecked).
    """
    _check_rate_dtype(p, name)
    if p.dim() == 0:
        if p.device != device and p.device.type != "cpu":
            raise ValueError(f"{name} as a 0-d tensor must be on x's device {device} or the CPU, got {p.device}")
    elif p.dim() != 1 or p.shape[0] != batch:
        raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor (N,) = ({batch},) of per-sample drop "
                         f"rates, got shape {tuple(p.shape)}")
    elif p.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {p.device}")
    return _check_rate_values(p, name)


def check_layer_rate(p, name: str = "p"):
    """A layer's drop rate, checked where the layer is built: a real number in [0, 1], returned as a
    float, or a floating-point tensor of drop rates in [0, 1], 0-d (one for every sample) or (N,)
    (one per sample; N and the device are checked against x at each forward), returned as it is."""
    if not isinstance(p, torch.Tensor):
        return check_probability(p, name)
    _check_rate_dtype(p, name)
    if p.dim() > 1:
        raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor (N,) of per-sample drop rates, "
                         f"got shape {tuple(p.shape)}")
    if not p.is_meta:
        _check_rate_values(p, name)
    return p


def _check_rate_dtype(p: torch.Tensor, name: str) -> None:
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float or a floating-point tensor of drop rates, got {p.dtype}")


def _check_rate_values(p: torch.Tensor, name: str) -> torch.Tensor:
    """p's rates as float64, each checked to be in [0, 1] unless their values are out of reach:
    under torch.compile, and for a tensor that a torch.func transform wraps (a vmapped p holds one
    value per vmapped call). A plain p inside a transform (captured, or made in the function) is
    read and checked."""
    rates = p.detach().to(torch.float64)
    if torch.compiler.is_compiling() or p.numel() == 0 or p.is_meta:
        return rates
    if in_func_transform() and torch._C._functorch.is_functorch_wrapped_tensor(p):
        return rates
    low, high = value_range(p)
    if not (0.0 <= low and high <= 1.0):  # False for NaN
        raise ValueError(f"{name} must hold drop rates in [0, 1], got values from {low} to {high}")
    return rates
