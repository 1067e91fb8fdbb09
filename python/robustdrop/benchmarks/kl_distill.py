"""kl_distill benchmark cases (EWS's distillation loss): ``robustdrop.ews.kl_distill``
against the naive baseline ``robustdrop.reference.kl_distill.kl_distill``, the torch
expression ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True,
reduction="batchmean")`` a user writes.

x is the student logits (N, K), the tensor that gets gradients; the teacher logits
are fixed, drawn once outside the timing. The loss is a scalar while the harness
feeds a gradient of x's shape to the backward, so both sides return the loss
broadcast to x's shape (``expand``: free in the forward; its backward sums the
(N, K) upstream gradient, the same extra work on both sides, so the ratios
understate the op's own speedup a little).

The issue's target: forward + backward at 256 x 1000 (a batch of ImageNet-sized
logits) at least 2x faster than the torch expression on the CPU.
"""
import torch

from robustdrop.benchmark import BenchConfig, Case, Target
from robustdrop.ops.kl_distill import kl_distill
from robustdrop.reference.kl_distill import kl_distill as torch_expression

OP = "kl_distill"

# (N, K), temperature
SETTINGS = [((256, 1000), 1.0), ((128, 100), 1.0), ((1024, 1000), 1.0)]
QUICK = [((8, 100), 2.0), ((5, 37), 1.0)]  # --quick: small, K not a multiple of a vector width
# On a GPU only: a batch that fills it (hundreds of MB), so launch and host time no longer hide the kernels.
FILL = [((4096, 32000), 1.0)]
TARGET = ((256, 1000), 1.0)
# Issue 6's target at TARGET, float32, forward + backward (it names none for a GPU).
TARGETS = (Target(6, "speedup_fwd_bwd", device="cpu", at_least=2.0),)


def cases(config: BenchConfig) -> list[Case]:
    settings = QUICK if config.quick else [*SETTINGS, *config.gpu_only(FILL)]
    return [_case(shape, temperature, config, TARGETS if (shape, temperature) == TARGET else ())
            for shape, temperature in settings]


def _case(shape, temperature, config: BenchConfig, targets=()) -> Case:
    generator = torch.Generator().manual_seed(1)
    teacher = (torch.randn(shape, generator=generator) * 3.0).to(device=config.device, dtype=config.dtype)

    def naive(x):
        return torch_expression(x, teacher, temperature, "batchmean").expand(x.shape)

    def ours(x, backend):
        return kl_distill(x, teacher, temperature=temperature, backend=backend).expand(x.shape)

    return Case(op=OP, params=f"T={temperature:g} batchmean", shape=shape, naive=naive, robustdrop=ours,
                targets=targets)
