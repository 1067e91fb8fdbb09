"""Records the specialisation of every Triton launch the interpreter runs.

With ``ROBUSTDROP_RECORD_TRITON_LAUNCHES=FILE`` and no GPU, ``tests/conftest.py``
installs this recorder, and at the end of the session FILE holds each distinct
launch: the kernel's module and name, and for every argument what Triton
specialises a compiled kernel on (a tensor's dtype and 16-byte alignment, an
integer's value, a constexpr's value, num_warps). ``compile_triton.py`` then
compiles exactly those kernels for the GPU.
"""
from __future__ import annotations

import inspect
import json

import torch

_launches: set[str] = set()


def describe(value) -> dict:
    """What a compiled Triton kernel specialises on, for one argument."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):  # a float argument is always fp32: its value does not matter
        return {"float": 0.5}
    if value is None:
        return {"none": None}
    raise TypeError(f"a Triton launch argument of type {type(value).__name__} cannot be recorded")


def add(fn, args: tuple, kwargs: dict) -> None:
    """Records one launch of the kernel function ``fn`` with these arguments."""
    names = list(inspect.signature(fn).parameters)
    arguments = {**dict(zip(names, args)), **kwargs}
    add_spec({"module": fn.__module__, "kernel": fn.__name__,
              "arguments": {name: describe(value) for name, value in arguments.items()}})


def add_spec(launch: dict) -> None:
    """Records a launch already described (an entry of a saved file)."""
    _launches.add(json.dumps(launch, sort_keys=True))


def launches() -> list[dict]:
    return [json.loads(launch) for launch in sorted(_launches)]


def install(run_kernels: bool = True) -> None:
    """Wraps the interpreter's launch so that each launch is recorded before it runs; with
    run_kernels=False it is only recorded (the outputs are left as they were)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def recorded_run(self, *args, grid, warmup, **kwargs):
        add(self.fn, args, kwargs)
        if run_kernels:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    interpreter.InterpretedFunction.run = recorded_run


def save(path: str) -> None:
    with open(path, "w") as file:
        json.dump(launches(), file, indent=0)
