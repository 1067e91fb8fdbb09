"""``python -m robustdrop info``: the environment report (versions, backends, GPU)."""
import argparse
import importlib.util
import os
import platform
import warnings

import torch

from robustdrop import _backend

HELP = "print torch/triton/robustdrop versions, the backends available here (or why not) and the GPU"


def report() -> str:
    import robustdrop

    if importlib.util.find_spec("triton") is None:
        triton_version = "not installed"
    else:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as error:  # a broken install is worth reporting, not crashing on
            triton_version = f"fails to import ({type(error).__name__}: {error})"
    lines = [
        f"robustdrop {robustdrop.__version__} ({robustdrop.__path__[0]})",
        f"python     {platform.python_version()} ({platform.platform()})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads)",
        f"triton     {triton_version}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            l2 = getattr(props, "L2_cache_size", 0)
            lines.append(f"gpu {index}      {props.name} (sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB" + (f", L2 {l2 / 2**20:.0f} MiB)" if l2 else ")"))
    else:
        lines.append("gpu        none visible to torch")
    lines.append("backends:")
    for name, status in robustdrop.backends().items():
        lines.append(f"  {name:<10} {'available' if status.available else 'unavailable'}"
                     + (f": {status.reason}" if status.reason else ""))
    lines.append(f"backend=\"auto\" on CPU tensors: {_auto_choice('cpu')}")
    if torch.cuda.is_available():
        lines.append(f"backend=\"auto\" on CUDA tensors: {_auto_choice('cuda')}")
    override = os.environ.get(_backend.ENV_VARIABLE)
    if override:
        lines.append(f"  ({_backend.ENV_VARIABLE}={override} is set and replaces auto's choice)")
    return "\n".join(lines)


def _auto_choice(device_type: str) -> str:
    """What backend="auto" runs on tensors of ``device_type`` here, or why it cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning is this line's answer
        try:
            return _backend.resolve_backend("auto", torch.empty(0, device=device_type))
        except (ValueError, RuntimeError) as error:
            return f"none ({error})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    print(report())
    return 0
