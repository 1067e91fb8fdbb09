"""robustdrop's layers with the rest of PyTorch: torch.autocast, channels_last
inputs, torch.compile(fullgraph=True) of the CIFAR ResNet-18 with a method's
layer placed in it, forward and backward, activation checkpointing,
torch.export, ONNX export, torch.vmap and CUDA graphs.

Autocast (CPU, bfloat16 and float16): the layers have no autocast rule of their
own; they receive what autocast made of the layer before them (a conv's output
in the low-precision dtype) and must compute on it exactly what they compute
with autocast off: the same output and input gradient, to the bit, in that
dtype. That holds only if no op inside a layer (a CAM's or a PCA's matmul, in
the reference) is silently recast by autocast.

channels_last: the same values in either layout give the same bits, forward and
backward, and every backend keeps the layout.

torch.compile: ``robustdrop.models.resnet18(method=...)`` compiled with the
default (Inductor) backend and ``fullgraph=True`` (a graph break fails), a
forward and a backward, against the same model run eagerly, two steps each.
``fallback_random`` makes the compiled graph draw its random numbers (the
layers' mask seeds, Active DropBlock's policy) with eager's generator, so the
same ``torch.manual_seed`` gives both runs the same masks; without it Inductor
draws them from its own stream (repeatable under ``torch.manual_seed``, but not
eager's numbers). The models run in float64 so that "equal to eager within
float rounding" is a tight statement: the compiled graph reorders batch-norm
reductions, and at batch 4 the batch norms' backward amplifies float32
rounding (measured with Random Mask at 32x32: the gradients of layer2's convs
are 1.5% of their largest value off float64's in eager float32, 6% in the
compiled float32 graph; in float64 compiled and eager agree to 1e-14), and
FDD's cells and CamDrop's top-k could flip on a float32 rounding.
"""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustdrop
from conftest import EMULATED_CUDA, assert_same_bits, available_backends, no_host_sync
from robustdrop import models
from robustdrop._backend import triton_interpreted
from robustdrop.ews import GatedNetwork, kl_distill
from robustdrop.nn import (ActiveDropBlock2d, CamDrop2d, DropBlock2d, FeatureDensityDropout1d, FeatureDensityDropout2d,
                           RandomMask2d, cam_targets, set_cam_targets)
from robustdrop.nn.active_drop_block import DEFAULT_POLICIES
from robustdrop.training import LinearRateSchedule, active_dropblock_step

BACKENDS = [name for name in ("cpu", "reference") if robustdrop.backends()[name].available]


def _cases(names, backends) -> list:
    """pytest parameters (name, backend), every pair; FDD-2D on the Triton interpreter skipped (half a minute
    to a minute a test there): FDD-1D runs the same Triton ops, feature_density_forward_triton and
    channel_mask_backward_triton, and FDD-2D runs on the other backends."""
    skip = pytest.mark.skip(reason="FDD-2D on the Triton interpreter: FDD-1D runs the same Triton ops")
    interpreted = triton_interpreted()
    return [pytest.param(name, backend, marks=skip if interpreted and name == "fdd2d" and backend == "triton" else ())
            for name in names for backend in backends]


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
MAP_LAYERS = ["drop_block", "active_drop_block", "cam_drop", "fdd2d", "random_mask"]
METHOD_LAYERS = (DropBlock2d, ActiveDropBlock2d, CamDrop2d, FeatureDensityDropout2d, RandomMask2d)
CHANNELS, CLASSES = 16, 10


def _layer(name: str, backend: str) -> tuple[nn.Module, torch.Tensor | None]:
    """A layer over (N, 16, H, W) maps (or (N, 16) features for "fdd1d") and, for CamDrop, the batch's targets."""
    if name == "drop_block":
        return DropBlock2d(0.2, 3, backend=backend), None
    if name == "active_drop_block":
        # No zero rate in the pool: every forward drops something.
        return ActiveDropBlock2d(3, policies=(0.1, 0.2), backend=backend), None
    if name == "cam_drop":
        classifier = nn.Linear(CHANNELS, CLASSES)
        target = torch.randint(0, CLASSES, (4,), generator=torch.Generator().manual_seed(5))
        return CamDrop2d(0.5, 3, classifier, channel_topk=4, backend=backend), target
    if name == "fdd2d":
        return FeatureDensityDropout2d(backend=backend), None
    if name == "fdd1d":
        return FeatureDensityDropout1d(backend=backend), None
    if name == "random_mask":
        return RandomMask2d(0.5, seed=3, backend=backend), None
    raise AssertionError(name)


def _forward(layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None, seed: int = 1) -> torch.Tensor:
    """The layer's training forward with torch's generator at ``seed``; CamDrop gets its targets the
    documented way, through ``cam_targets``."""
    torch.manual_seed(seed)
    if target is None:
        return layer(x)
    with cam_targets(layer, target):
        return layer(x)


def _run(layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None, grad_y: torch.Tensor):
    """(y, dx): the layer's output on x and its input gradient for grad_y."""
    y = _forward(layer, x, target)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    return y, grad_x


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MAP_LAYERS + ["fdd1d"])
def test_layer_under_autocast(name, backend, dtype):
    """After an autocast conv (or linear), the layer computes on its low-precision output exactly what it
    computes on the same tensor with autocast off, forward and backward."""
    torch.manual_seed(0)
    layer, target = _layer(name, backend)
    producer = nn.Linear(20, CHANNELS) if name == "fdd1d" else nn.Conv2d(3, CHANNELS, 3, padding=1)
    x = torch.randn(4, 20) if name == "fdd1d" else torch.randn(4, 3, 12, 12)
    with torch.autocast("cpu", dtype=dtype):
        features = producer(x)
        y = _forward(layer, features, target)
    assert features.dtype == dtype and y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (grad_features,) = torch.autograd.grad(y, features, grad_y)
    assert grad_features.dtype == dtype and torch.isfinite(grad_features).all()

    plain = features.detach().requires_grad_()
    y_plain, grad_plain = _run(layer, plain, target, grad_y)
    assert_same_bits(y, y_plain)
    assert_same_bits(grad_features, grad_plain)
    assert not torch.equal(y, features)  # the layer did drop something


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_distill_under_autocast(backend, dtype):
    """kl_distill on autocast logits: a float32 loss, a gradient in the logits' dtype, both as with autocast off."""
    torch.manual_seed(0)
    classifier = nn.Linear(CHANNELS, CLASSES)
    with torch.autocast("cpu", dtype=dtype):
        student = classifier(torch.randn(6, CHANNELS))
        teacher = classifier(torch.randn(6, CHANNELS)).detach()
        loss = kl_distill(student, teacher, backend=backend)
    assert student.dtype == dtype and loss.dtype == torch.float32 and loss.item() > 0.0
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == dtype and torch.isfinite(grad).all()

    plain = student.detach().requires_grad_()
    loss_plain = kl_distill(plain, teacher, backend=backend)
    (grad_plain,) = torch.autograd.grad(loss_plain, plain)
    assert_same_bits(loss, loss_plain)
    assert_same_bits(grad, grad_plain)


GATED, NEXT_CONV = "layer2.0.bn1", "layer2.0.conv2"  # a channel-gated batch norm; relu'd, it feeds the conv


@contextlib.contextmanager
def _record_gate(model: nn.Module):
    """Yields a dict that hooks fill with GATED's output before its gate (registered before the gate's
    hook, they run first) and NEXT_CONV's input, the gated maps after the relu; removes them on exit."""
    seen = {}

    def before_gate(module, inputs, output):
        seen["before"] = output.detach()

    def after_gate(module, inputs):
        seen["after"] = inputs[0].detach()

    handles = [model.get_submodule(GATED).register_forward_hook(before_gate),
               model.get_submodule(NEXT_CONV).register_forward_pre_hook(after_gate)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _subnet_and_model(memory_format=torch.contiguous_format):
    """The CIFAR ResNet-18 gated by EWS, a random subnet, and two 8x8 inputs in ``memory_format`` (small:
    float16 convolutions are slow on a CPU)."""
    torch.manual_seed(0)
    model = models.resnet18().to(memory_format=memory_format)
    network = GatedNetwork(model, backend="cpu" if "cpu" in BACKENDS else "reference")
    subnet = network.random_subnet(torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=memory_format)
    return model, network, subnet, x


def _assert_gated(seen: dict, keep: torch.Tensor) -> None:
    """The gated maps are relu(the batch norm's output) on the kept channels and exactly zero on the others."""
    keep = keep.view(1, -1, 1, 1)
    expected = torch.where(keep, torch.relu(seen["before"]), torch.zeros((), dtype=seen["before"].dtype))
    assert_same_bits(seen["after"], expected)
    assert not keep.all()


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_gated_resnet18_under_autocast(dtype):
    """EWS on ResNet-18 under autocast: the full subnet is the model, a subnet's gates zero exactly its
    dropped channels in the low-precision maps, and the EWS loss (CE + KL) gives finite gradients."""
    model, network, subnet, x = _subnet_and_model()
    model.eval()
    with torch.autocast("cpu", dtype=dtype):
        assert_same_bits(network(x, network.full_subnet()), model(x))
        with _record_gate(model) as seen:
            out = network(x, subnet)
    assert out.dtype == dtype and seen["after"].dtype == dtype
    _assert_gated(seen, subnet.channels[GATED])

    model.train()
    target = torch.tensor([3, 7])
    with torch.autocast("cpu", dtype=dtype):
        full = model(x)
        loss = F.cross_entropy(full, target) + kl_distill(network(x, subnet), full.detach())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(grad).all() for grad in grads)


# ---------------------------------------------------------------- channels_last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MAP_LAYERS)
def test_layer_channels_last(name, backend):
    """channels_last input: the contiguous input's output and gradient, to the bit, with the same seed."""
    torch.manual_seed(0)
    layer, target = _layer(name, backend)
    x = torch.randn(4, CHANNELS, 12, 12)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y, grad_x = _run(layer, x.clone().requires_grad_(), target, grad_y)
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y_last, grad_last = _run(layer, x_last, target, grad_y.contiguous(memory_format=torch.channels_last))
    assert_same_bits(y_last, y)
    assert_same_bits(grad_last, grad_x)
    assert not torch.equal(y, x)
    assert y_last.is_contiguous(memory_format=torch.channels_last)
    assert grad_last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fdd1d_non_contiguous_features(backend):
    """FDD-1D takes (N, F) features, which have no channels_last: a transposed (strided) input instead."""
    layer, _ = _layer("fdd1d", backend)
    x = torch.randn(4, CHANNELS)
    strided = torch.randn(CHANNELS, 4).t().copy_(x).requires_grad_()
    assert not strided.is_contiguous()
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y, grad_x = _run(layer, x.clone().requires_grad_(), None, grad_y)
    y_strided, grad_strided = _run(layer, strided, None, grad_y)
    assert_same_bits(y_strided, y)
    assert_same_bits(grad_strided, grad_x)


def test_gated_resnet18_channels_last():
    """EWS on a channels_last ResNet-18: the gates keep the layout, zero exactly the dropped channels, and the
    output is the contiguous model's up to the convolutions' float rounding in the other layout."""
    model, network, subnet, x = _subnet_and_model()
    model.eval()
    expected = network(x, subnet)
    model_last, network_last, subnet_last, x_last = _subnet_and_model(torch.channels_last)
    model_last.eval()
    for name in network.names:
        kind = "paths" if name in network.blocks else "channels"
        assert torch.equal(getattr(subnet, kind)[name], getattr(subnet_last, kind)[name])
    with _record_gate(model_last) as seen:
        out = network_last(x_last, subnet_last)
    assert seen["after"].is_contiguous(memory_format=torch.channels_last) and not seen["after"].is_contiguous()
    _assert_gated(seen, subnet_last.channels[GATED])
    torch.testing.assert_close(out, expected)

    model_last.train()
    loss = kl_distill(network_last(x_last, subnet_last), model_last(x_last).detach())
    grads = torch.autograd.grad(loss, list(model_last.parameters()))
    assert all(torch.isfinite(grad).all() for grad in grads)


# ---------------------------------------------------------------- activation checkpointing

class _Checkpointed(nn.Module):
    """``inner`` under torch.utils.checkpoint: its activations are dropped and its forward recomputed in the
    backward."""

    def __init__(self, inner: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.inner = inner
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.use_reentrant)


def _backward_grads(loss: torch.Tensor, tensors: list) -> list:
    """The gradients of ``loss`` for ``tensors`` by ``loss.backward()``: reentrant checkpointing refuses
    torch.autograd.grad."""
    for tensor in tensors:
        tensor.grad = None
    loss.backward()
    return [tensor.grad for tensor in tensors]


def _checkpoint_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, seed: int):
    """A training step's output and gradients (parameters, then x), the backward after the forward's
    ``cam_targets`` context has ended, as the README's loop does."""
    y = _forward(model, x, target, seed)
    return y.detach(), _backward_grads(y.square().sum(), list(model.parameters()) + [x])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", MAP_LAYERS + ["fdd1d"])
def test_layer_under_activation_checkpointing(name, use_reentrant):
    """A layer between two convolutions (linear layers for FDD-1D) inside torch.utils.checkpoint, which recomputes its forward in the
    backward: two steps give the output and every gradient of the same model without checkpointing, to the
    bit. The recompute replays the forward's random state (checkpoint restores it); CamDrop replays its
    targets, gone by then, and its warm-up (one step here, so the first step is DropBlock and the second
    guided; a recompute that counted a step again would guide the first step's mask)."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    layer, target = _layer(name, backend)
    if name == "cam_drop":
        layer.warmup_steps = 1
    torch.manual_seed(0)
    if name == "fdd1d":
        block, x = nn.Sequential(nn.Linear(6, CHANNELS), layer, nn.Linear(CHANNELS, 8)), torch.randn(4, 6)
    else:
        block = nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1), layer, nn.Conv2d(CHANNELS, 8, 3, padding=1))
        x = torch.randn(4, 3, 8, 8)
    plain = block.double().train()
    checkpointed = _Checkpointed(copy.deepcopy(plain), use_reentrant)
    x = x.double().requires_grad_()
    for seed in (10, 11):
        y, grads = _checkpoint_step(plain, x, target, seed)
        y_checkpointed, grads_checkpointed = _checkpoint_step(checkpointed, x, target, seed)
        assert_same_bits(y_checkpointed, y)
        for grad_checkpointed, grad in zip(grads_checkpointed, grads):
            assert_same_bits(grad_checkpointed, grad)
    if name == "cam_drop":
        assert int(checkpointed.inner[1].num_steps) == int(plain[1].num_steps) == 2


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_active_step_under_activation_checkpointing(mode, use_reentrant):
    """active_dropblock_step on a model whose ActDB layer is checkpointed: the backward of the chosen loss
    runs after the step, so the recompute must put back the policy the step chose (sequential) or every
    policy (batched). The same losses, choice and gradients, to the bit, as without checkpointing."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    torch.manual_seed(0)
    plain = _active_step_model((0.05, 0.1, 0.2, 0.3), backend)
    copied = copy.deepcopy(plain)
    # The ActDB layer and the convolution after it (no BatchNorm, whose recompute would update its
    # running statistics a second time, as it does under checkpointing everywhere).
    checkpointed = nn.Sequential(*copied[:3], _Checkpointed(copied[3:5], use_reentrant), *copied[5:])
    data = torch.Generator().manual_seed(1)
    for seed in (10, 11):
        x = torch.randn(4, 3, 9, 9, generator=data, dtype=torch.float64)
        target = torch.randint(0, 5, (4,), generator=data)
        results = []
        for model in (plain, checkpointed):
            torch.manual_seed(seed)
            step = active_dropblock_step(model, F.cross_entropy, x, target, mode=mode)
            results.append((step, _backward_grads(step.loss, list(model.parameters()))))
        (step, grads), (step_checkpointed, grads_checkpointed) = results
        assert_same_bits(step_checkpointed.losses, step.losses)
        assert step_checkpointed.policy_index == step.policy_index
        for grad_checkpointed, grad in zip(grads_checkpointed, grads):
            assert_same_bits(grad_checkpointed, grad)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_cam_drop_forwards_sharing_one_backward_under_activation_checkpointing(use_reentrant):
    """Several checkpointed CamDrop forwards before one backward, each with its own targets and warm-up
    state: two batches (the second of another size), then the layer used twice in one forward. Each
    recompute takes its own forward's targets and guidance (not the last forward's), so the gradients equal
    those without checkpointing, to the bit."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    layer, _ = _layer("cam_drop", backend)
    layer.warmup_steps = 1  # the first forward is DropBlock, the later ones guided
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1), layer).double().train()
    checkpointed = _Checkpointed(copy.deepcopy(plain), use_reentrant)
    data = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 3, 8, 8, generator=data, dtype=torch.float64).requires_grad_(),
                torch.randint(0, CLASSES, (n,), generator=data)) for n in (4, 4, 3)]

    def run(model):
        torch.manual_seed(7)
        outputs = []
        for x, target in batches[:2]:
            with cam_targets(model, target):
                outputs.append(model(x))
        x, target = batches[2]
        with cam_targets(model, target):
            outputs.append(model(model(x)[:, :3]))  # the same layer twice in one forward
        loss = sum(output.square().sum() for output in outputs)
        return outputs, _backward_grads(loss, list(model.parameters()) + [x for x, _ in batches])

    (outputs, grads), (outputs_checkpointed, grads_checkpointed) = run(plain), run(checkpointed)
    for output_checkpointed, output in zip(outputs_checkpointed, outputs):
        assert_same_bits(output_checkpointed, output)
    for grad_checkpointed, grad in zip(grads_checkpointed, grads):
        assert_same_bits(grad_checkpointed, grad)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_active_steps_sharing_one_backward_under_activation_checkpointing(use_reentrant):
    """Two sequential active_dropblock_steps whose losses are summed for one backward, the ActDB layer
    checkpointed, and a pool with the rate 0.0, which draws no seed, so its forward starts from the random
    state the next policy's starts from. A loss made largest where nothing is dropped picks 0.0 in the
    first step; each recompute uses its own step's chosen policy, so the gradients equal those without
    checkpointing, to the bit."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    torch.manual_seed(0)
    weight = torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ActiveDropBlock2d(3, policies=(0.0, 0.2, 0.4),
                                                                           backend=backend)).double().train()
    checkpointed = nn.Sequential(plain[0], _Checkpointed(plain[1], use_reentrant))

    def kept_count_loss(outputs, bonus):
        # The kept count (no gradient) dominates when bonus is large, so the policy 0.0 wins.
        return (outputs * weight).sum() + bonus * (outputs != 0).sum().to(outputs.dtype)

    data = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 3, 9, 9, generator=data, dtype=torch.float64) for _ in range(2)]
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        steps = [active_dropblock_step(model, kept_count_loss, x, bonus, mode="sequential")
                 for x, bonus in zip(inputs, (1e3, -1e3))]
        results.append((steps, _backward_grads(steps[0].loss + steps[1].loss, list(plain.parameters()))))
    (steps, grads), (steps_checkpointed, grads_checkpointed) = results
    assert [step.policy_index for step in steps] == [0, 2]
    assert [step.policy_index for step in steps_checkpointed] == [0, 2]
    for grad_checkpointed, grad in zip(grads_checkpointed, grads):
        assert_same_bits(grad_checkpointed, grad)


def test_gated_call_under_activation_checkpointing():
    """EWS's gates are forward hooks that live for one GatedNetwork call, so the call is what gets
    checkpointed (README): its recompute installs them again, and the gradients are those without
    checkpointing, to the bit."""
    model, network, subnet, x = _subnet_and_model()
    results = []
    for run in (lambda: network(x, subnet),
                lambda: torch.utils.checkpoint.checkpoint(network, x, subnet, use_reentrant=False)):
        parameters = list(model.parameters())
        grads = _backward_grads(run().square().sum(), parameters)
        results.append([grad for grad in grads if grad is not None])
    assert len(results[0]) == len(results[1]) > 0
    for grad_checkpointed, grad in zip(results[1], results[0]):
        assert_same_bits(grad_checkpointed, grad)


# ---------------------------------------------------------------- torch.compile of ResNet-18


COMPILED_METHODS = ["dropblock", "active_dropblock", "camdrop", "fdd", "random_mask"]


def _changes(model: nn.Module) -> tuple[list, list]:
    """Forward hooks on the method's layers that record whether each forward changed its input."""
    changed, handles = [], []
    for module in model.modules():
        if isinstance(module, METHOD_LAYERS):
            handles.append(module.register_forward_hook(
                lambda module, inputs, output: changed.append(not torch.equal(output, inputs[0]))))
    return changed, handles


def _step(model: nn.Module, method: str, x: torch.Tensor, target: torch.Tensor, seed: int):
    """(logits, loss, parameter gradients) of one training forward and backward, the generator at ``seed``."""
    torch.manual_seed(seed)
    if method == "camdrop":
        with cam_targets(model, target):  # the documented way to give CamDrop its targets
            logits = model(x)
    else:
        logits = model(x)
    loss = F.cross_entropy(logits, target)
    return logits.detach(), loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("fullgraph,compiler", [(True, "inductor"), (False, "aot_eager")],
                         ids=["fullgraph-inductor", "default-aot_eager"])
@pytest.mark.parametrize("method", COMPILED_METHODS)
def test_resnet18_compiled_matches_eager(method, fullgraph, compiler):
    """torch.compile(resnet18(method=...)) trains as the eager model does: for two steps (new data, new
    seeds, no recompilation) the same logits and loss within float64 rounding and the same, finite
    parameter gradients. With fullgraph=True and Inductor; and with torch.compile's default
    fullgraph=False, where the model must still be one graph: a drawn seed stays a tensor (the ops'
    ``_drawn_seed`` variants), so no ``.item()`` splits the graph at a method's layer. That part is
    Dynamo's, so the cheaper "aot_eager" backend (Dynamo, fake tensors, AOTAutograd) checks it."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = models.resnet18(method=method).double()
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=data, dtype=torch.float64),
                torch.randint(0, 10, (4,), generator=data)) for _ in range(2)]
    if method == "random_mask":
        with torch.no_grad():  # the masks are built at the first forward: before compiling (RandomMask2d)
            model.eval()(batches[0][0])
    model.train()
    eager = copy.deepcopy(model)
    changed, handles = _changes(eager)
    compiled = torch.compile(model, fullgraph=fullgraph, backend=compiler)
    with torch._inductor.config.patch(fallback_random=True), torch._dynamo.config.patch(error_on_recompile=True):
        for step, (x, target) in enumerate(batches):
            logits, loss, grads = _step(compiled, method, x, target, seed=10 + step)
            logits_eager, loss_eager, grads_eager = _step(eager, method, x, target, seed=10 + step)
            torch.testing.assert_close(logits, logits_eager)
            torch.testing.assert_close(loss, loss_eager)
            for grad, grad_eager in zip(grads, grads_eager):
                assert torch.isfinite(grad).all()
                torch.testing.assert_close(grad, grad_eager)
    for handle in handles:
        handle.remove()
    assert changed and all(changed)  # every forward of the method's layers dropped something
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _active_step_model(policies, backend: str) -> nn.Module:
    """A small float64 CNN with a BatchNorm on each side of an ActiveDropBlock2d layer."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         ActiveDropBlock2d(3, policies=policies, backend=backend), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).double().train()


def _active_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int):
    """One sequential active_dropblock_step from ``seed``: the step and the chosen loss's parameter gradients."""
    torch.manual_seed(seed)
    step = active_dropblock_step(model, F.cross_entropy, x, target)
    return step, torch.autograd.grad(step.loss, list(model.parameters()))


def test_sequential_active_step_compiles_once():
    """The sequential step on a torch.compile(fullgraph=True) model: ten policies (more than Dynamo's default
    limit of eight recompiles) and two steps with one compile, and the same losses, choice, gradients and
    BatchNorm statistics as the eager step. The pool has no zero rate: a compiled zero-rate forward draws a
    mask seed that eager skips (ActiveDropBlock2d._forward_traced), which would shift the later draws."""
    torch._dynamo.reset()
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    policies = tuple(0.02 * (k + 1) for k in range(10))
    torch.manual_seed(0)
    model = _active_step_model(policies, backend)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    data = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (10, 11):
            x = torch.randn(4, 3, 9, 9, generator=data, dtype=torch.float64)
            target = torch.randint(0, 5, (4,), generator=data)
            step, grads = _active_step(compiled, x, target, seed)
            step_eager, grads_eager = _active_step(eager, x, target, seed)
            assert len(set(step.losses.tolist())) == len(policies)  # every policy ran with its own rate
            torch.testing.assert_close(step.losses, step_eager.losses)
            assert (step.policy_index, step.policy) == (step_eager.policy_index, step_eager.policy)
            assert torch.equal(step.loss.detach(), step.losses.max())
            for grad, grad_eager in zip(grads, grads_eager):
                torch.testing.assert_close(grad, grad_eager)
            for buffer, buffer_eager in zip(model.buffers(), eager.buffers()):
                torch.testing.assert_close(buffer, buffer_eager, rtol=0, atol=1e-12)
    layer = model[3]
    assert layer.step_policy_index is None and layer.policy is None


@pytest.mark.parametrize("fullgraph", [True, False])
def test_sequential_active_step_default_pool_compiled(fullgraph):
    """The paper's pool (a zero rate first) on a compiled model, with and without fullgraph: the steps do not
    recompile per policy (without fullgraph the seed's graph break recompiles once, for a dynamic seed), the
    zero rate's loss is eager's, and the loss to train is the largest."""
    torch._dynamo.reset()
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    torch.manual_seed(0)
    model = _active_step_model(DEFAULT_POLICIES, backend)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    x, target = torch.randn(4, 3, 9, 9, dtype=torch.float64), torch.randint(0, 5, (4,))
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for seed in (10, 11, 12):
            step, _ = _active_step(compiled, x, target, seed)
            step_eager, _ = _active_step(eager, x, target, seed)
            assert step.losses.shape == (10,) and torch.equal(step.loss.detach(), step.losses.max())
            torch.testing.assert_close(step.losses[0], step_eager.losses[0])


def test_active_drop_block_change_threshold_compiled():
    """Algorithm 1's re-pick reads norms on the host: compiled without fullgraph it runs between graphs and
    re-picks as eager does; with fullgraph=True the error names it."""
    torch._dynamo.reset()
    layer = ActiveDropBlock2d(3, policies=(0.0, 0.3), change_threshold=0.05,
                              backend="cpu" if "cpu" in BACKENDS else "reference")
    layer.policy = 0.0  # no change: the re-pick must move to 0.3
    x = torch.rand(2, 3, 16, 16) + 1.0
    torch.manual_seed(3)
    y = torch.compile(layer, backend="aot_eager")(x)
    assert layer.last_policy == 0.3
    torch.manual_seed(3)
    assert_same_bits(y, layer(x))
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="change_threshold reads norms on the host"):
        torch.compile(layer, fullgraph=True, backend="aot_eager")(x)


def _assert_compiled_is_eager(compiled, layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, *,
                              seed: int) -> torch.Tensor:
    """The compiled layer's output and input gradient from ``seed`` are the eager layer's, to the bit; returns y."""
    torch.manual_seed(seed)
    y = compiled(x)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    torch.manual_seed(seed)
    y_eager = layer(x)
    (grad_eager,) = torch.autograd.grad(y_eager, x, grad_y)
    assert_same_bits(y, y_eager)
    assert_same_bits(grad_x, grad_eager)
    return y


# DropBlock's linear schedule: from no drop to the target rate, more values than Dynamo's default limit of 8.
RATE_SCHEDULE = tuple(0.02 * k for k in range(12))


def _scheduled_layer(method: str, normalize: str, spatial_topk: int = 60) -> nn.Module:
    """A DropBlock2d or a CamDrop2d (its targets set) at p = 0.1, for (3, 4, H, W) inputs."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    if method == "dropblock":
        return DropBlock2d(0.1, 3, normalize=normalize, backend=backend)
    layer = CamDrop2d(0.1, 3, nn.Linear(8, 5), spatial_topk=spatial_topk, channel_topk=3, backend=backend)
    layer.target = torch.tensor([4, 0, 2])
    return layer


@pytest.mark.parametrize("method,fullgraph,compiler,normalize", [
    ("dropblock", True, "aot_eager", "batch"), ("dropblock", False, "aot_eager", "sample"),
    ("dropblock", True, "inductor", "batch"), ("camdrop", True, "aot_eager", "batch"),
    ("camdrop", True, "inductor", "batch"),
], ids=["dropblock-fullgraph-aot_eager", "dropblock-default-aot_eager-sample", "dropblock-fullgraph-inductor",
        "camdrop-fullgraph-aot_eager", "camdrop-fullgraph-inductor"])
def test_rate_schedule_compiles_once(method, fullgraph, compiler, normalize):
    """DropBlock2d's or CamDrop2d's p reassigned at every step, as DropBlock's schedule does (CamDrop's
    authors use it too), on a compiled layer: at most three graphs for twelve rates (the constructor's
    constant rate, p == 0 and the traced rate), and every step gives eager's output and input gradient to
    the bit. p == 0 is the identity without a seed draw, so the later steps' seeds stay eager's. Inductor
    lowers the traced rate's arithmetic itself, so it checks that the float64 gamma it computes is the
    float one, bit for bit."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = _scheduled_layer(method, normalize, spatial_topk=200)
    compiled = torch.compile(layer, fullgraph=fullgraph, backend=compiler)
    x = torch.randn(3, 4, 16, 16, requires_grad=True)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch._inductor.config.patch(fallback_random=True), \
            torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        for step, rate in enumerate((0.1,) + RATE_SCHEDULE):
            if step > 0:
                layer.p = rate
            y = _assert_compiled_is_eager(compiled, layer, x, grad_y, seed=step)
            assert rate == 0.0 or not torch.equal(y, x)  # every non-zero rate dropped something
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize("method", ["dropblock", "camdrop"])
def test_rate_reassigned(method):
    """p's setter: the module reads as before (repr, state_dict), a bad rate is refused with p's name at the
    forward, eager and compiled, a copied layer's rate is its own, and a layer built under inference mode
    takes a new rate."""
    layer = _scheduled_layer(method, "batch")
    state = layer.state_dict()
    layer.p = 0.25
    assert layer.p == 0.25 and "p=0.25" in repr(layer) and layer.state_dict().keys() == state.keys()
    twin = copy.deepcopy(layer)
    twin.p = 0.5
    assert layer.p == 0.25 and float(layer._rate) == 0.25 and float(twin._rate) == 0.5
    with torch.inference_mode():
        built_for_inference = _scheduled_layer(method, "batch")
    built_for_inference.p = 0.2  # its rate tensor is not an inference tensor
    assert float(built_for_inference._rate) == 0.2
    layer.target = torch.tensor([1, 3])
    x = torch.randn(2, 4, 8, 8)
    for bad, error in ((1.5, ValueError), (float("nan"), ValueError), (True, TypeError), ("0.1", TypeError)):
        layer.p = bad
        with pytest.raises(error, match="^p must"):
            layer(x)
        torch._dynamo.reset()
        with pytest.raises(error, match="^p must"):
            torch.compile(layer, backend="aot_eager")(x)
    rates = torch.tensor([0.0, 0.3])
    layer.p = rates  # a per-sample rate, as drop_block2d and cam_drop2d take
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    if method == "dropblock":
        expected = robustdrop.drop_block2d(x, rates, 3)
    else:
        expected = robustdrop.cam_drop2d(x, layer.classifier.weight, layer.target, rates, 3, spatial_topk=60,
                                         channel_topk=3)
    assert_same_bits(y, expected)
    assert (y[0] != 0).all() and (y[1] == 0).any()  # only the second sample drops blocks


def _three_scheduled_layers() -> nn.ModuleList:
    return nn.ModuleList([DropBlock2d(0.1, 3), nn.ReLU(), DropBlock2d(0.3, 5), CamDrop2d(0.2, 3, nn.Linear(4, 2))])


@pytest.mark.parametrize("start,end,first,last", [
    (0.0, None, [0.0, 0.0, 0.0], [0.1, 0.3, 0.2]),  # DropBlock's: from no drop to each layer's p
    (None, 0.0, [0.1, 0.3, 0.2], [0.0, 0.0, 0.0]),  # CamDrop's Table 5, inverted
    (0.05, 0.25, [0.05] * 3, [0.25] * 3),
], ids=["drop_block", "inverted", "explicit"])
def test_linear_rate_schedule_sets_every_layer(start, end, first, last):
    """Every DropBlock2d and CamDrop2d of the model, in module order: the start at step 0, a straight line,
    the end exactly from step T on."""
    model = _three_scheduled_layers()
    schedule = LinearRateSchedule(model, total_steps=4, start=start, end=end)
    layers = [model[0], model[2], model[3]]
    assert schedule.layers == layers
    seen = []
    for step in range(7):
        assert schedule.last_step == step
        rates = [layer.p for layer in layers]
        assert rates == schedule.rates()
        seen.append(rates)
        schedule.step()
    assert seen[0] == first and all(rates == last for rates in seen[4:])
    for step in (1, 2, 3):
        assert seen[step] == pytest.approx([a + (b - a) * step / 4 for a, b in zip(first, last)], abs=1e-15)


def test_linear_rate_schedule_resumes_from_its_state_dict():
    """The state keeps the targets as well as the step: a model rebuilt mid-schedule with its current rates (the
    layers' p is not in their state_dict) holds no memory of the targets, so a new schedule on it would otherwise
    aim at the wrong rates."""
    model = _three_scheduled_layers()
    schedule = LinearRateSchedule(model, total_steps=10)
    for _ in range(3):
        schedule.step()
    state, rates = schedule.state_dict(), schedule.rates()
    resumed_model = _three_scheduled_layers()
    for layer, rate in zip([resumed_model[0], resumed_model[2], resumed_model[3]], rates):
        layer.p = rate
    resumed = LinearRateSchedule(resumed_model, total_steps=10)
    assert resumed.targets != schedule.targets
    resumed.load_state_dict(state)
    assert resumed.last_step == 3 and resumed.targets == [0.1, 0.3, 0.2]
    assert [layer.p for layer in resumed.layers] == rates
    for _ in range(7):
        resumed.step()
    assert [layer.p for layer in resumed.layers] == [0.1, 0.3, 0.2]


def test_linear_rate_schedule_state_restores_its_settings_and_refuses_what_cannot_fit():
    """Like torch's schedulers, the state holds T, start and end and restores them. A state without the
    target rates that this schedule's start or end None needs (saved by one with both set, before they were
    part of the state) is a ValueError naming that, and leaves the schedule as it was."""
    explicit = LinearRateSchedule(_three_scheduled_layers(), total_steps=4, start=0.0, end=0.2)
    explicit.step()
    own_rates = LinearRateSchedule(_three_scheduled_layers(), total_steps=8, start=None, end=0.0)
    own_rates.load_state_dict(explicit.state_dict())
    assert (own_rates.total_steps, own_rates.start, own_rates.end, own_rates.last_step) == (4, 0.0, 0.2, 1)
    assert own_rates.rates() == explicit.rates() == [0.05] * 3
    older = LinearRateSchedule(_three_scheduled_layers(), total_steps=8, start=None, end=0.0)
    before = older.rates()
    with pytest.raises(ValueError, match="no target rate"):
        older.load_state_dict({"last_step": 1, "targets": [None] * 3})
    assert older.rates() == before and older.last_step == 0
    older.step()
    assert older.rates() == pytest.approx([0.1 * 7 / 8, 0.3 * 7 / 8, 0.2 * 7 / 8], abs=1e-15)


def test_a_second_linear_rate_schedule_aims_at_the_layers_own_rates():
    """A second schedule (a second training stage, a re-run notebook cell) takes the rates the layers had when
    the first took them over, not the p the first left (0.0 at its step 0), also on a deepcopy of the model;
    a p set by hand since is the layer's own rate again."""
    model = models.SmallCNN(method="dropblock", p=0.2)
    LinearRateSchedule(model, total_steps=10)
    assert model.drop.p == 0.0
    second = LinearRateSchedule(model, total_steps=10)
    assert second.targets == [0.2]
    for _ in range(10):
        second.step()
    assert model.drop.p == 0.2
    layers = _three_scheduled_layers()
    first = LinearRateSchedule(layers, total_steps=4, start=None, end=0.0)  # the inverted schedule
    first.step()
    assert LinearRateSchedule(copy.deepcopy(layers), total_steps=4).targets == [0.1, 0.3, 0.2]
    assert LinearRateSchedule(layers, total_steps=4, start=0.05, end=0.25).targets == [None] * 3
    assert LinearRateSchedule(layers, total_steps=4).targets == [0.1, 0.3, 0.2]  # an explicit one in between
    layers[2].p = 0.4  # by hand: the layer's own rate is now 0.4
    assert LinearRateSchedule(layers, total_steps=4).targets == [0.1, 0.4, 0.2]
    resumed = LinearRateSchedule(layers, total_steps=4)
    resumed.load_state_dict({"last_step": 1, "targets": [0.15, 0.3, 0.2]})  # a state's targets are remembered
    assert LinearRateSchedule(layers, total_steps=4).targets == [0.15, 0.3, 0.2]


def test_linear_rate_schedule_bad_input_is_a_clear_error():
    model = _three_scheduled_layers()
    for kwargs, error, message in [
        (dict(total_steps=0), ValueError, "total_steps must be >= 1"),
        (dict(total_steps=2.5), TypeError, "total_steps must be an int"),
        (dict(total_steps=5, start=1.5), ValueError, r"start must be in \[0, 1\]"),
        (dict(total_steps=5, end="0.1"), TypeError, "end must be a real number"),
    ]:
        with pytest.raises(error, match=message):
            LinearRateSchedule(model, **kwargs)
    with pytest.raises(ValueError, match="model has no DropBlock2d or CamDrop2d"):
        LinearRateSchedule(nn.Sequential(nn.Conv2d(3, 3, 1), ActiveDropBlock2d(3)), total_steps=5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        LinearRateSchedule([DropBlock2d(0.1, 3)], total_steps=5)
    per_sample = DropBlock2d(torch.tensor([0.1, 0.2]), 3)
    with pytest.raises(TypeError, match="the schedule's layers must have a float p"):
        LinearRateSchedule(per_sample, total_steps=5)
    LinearRateSchedule(per_sample, total_steps=5, start=0.0, end=0.2)  # no target needed
    schedule = LinearRateSchedule(model, total_steps=5)
    with pytest.raises(ValueError, match="state has 2 target rates, but the model has 3 scheduled layers"):
        schedule.load_state_dict({"last_step": 1, "targets": [0.1, 0.2]})
    with pytest.raises(ValueError, match="last_step must be an int >= 0"):
        schedule.load_state_dict({"last_step": -1, "targets": [0.1, 0.2, 0.3]})


def test_linear_rate_schedule_trains_a_compiled_model_without_recompiling():
    """Twelve scheduled rates through a compiled model's training steps: two graphs (p == 0 and p > 0),
    where a float rate per step would pass Dynamo's limit."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    model = models.SmallCNN(method="dropblock", stage=2, p=0.2, block_size=3, backend=backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    schedule = LinearRateSchedule(model, total_steps=10)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for _ in range(12):
            F.cross_entropy(compiled(x), y).backward()
            schedule.step()
    assert model.drop.p == 0.2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("normalize", ["batch", "sample", "none"])
def test_active_drop_block_random_policy_traced(normalize):
    """Active DropBlock's own policy draw (outside ``active_dropblock_step``) under fullgraph tracing: the
    policy stays a tensor, yet every draw, a zero rate included, gives eager's output and gradient.
    The "aot_eager" backend traces as Inductor does (Dynamo, fake tensors, AOTAutograd) at a fraction of
    the compile time; the ResNet-18 test above runs the layer through Inductor."""
    torch._dynamo.reset()
    layer = ActiveDropBlock2d(3, policies=(0.0, 0.15, 0.3), normalize=normalize,
                              backend="cpu" if "cpu" in BACKENDS else "reference")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    policies = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(6):
            _assert_compiled_is_eager(compiled, layer, x, grad_y, seed=seed)
            policies.add(layer.last_policy)
    assert policies == {0.0, 0.15, 0.3}


# ---------------------------------------------------------------- torch.export

EXPORTED_METHODS = ("dropblock", "active_dropblock", "camdrop", "fdd2d", "fdd1d", "random_mask")
# The compiled and Triton backends export a training forward; the reference reads its drawn seed as a
# Python int, which export cannot trace (test_reference_training_export_is_a_clear_error). These tests
# run on CPU tensors: Triton's only through its interpreter.
EXPORT_BACKENDS = [name for name in available_backends("cpu") if name != "reference"]


class _TrainingStep(nn.Module):
    """model(x) with the batch's targets y given to its CamDrop layers: an input of the exported program,
    where targets set on the model before export would be constants of it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.model.method != "camdrop":
            return self.model(x)
        with cam_targets(self.model, y):
            return self.model(x)


def _exported_model(method: str, backend: str) -> nn.Module:
    torch.manual_seed(0)
    model = models.SmallCNN(method=method, **({} if method == "random_mask" else {"backend": backend}))
    with torch.no_grad():  # Random Mask builds its masks at the first forward: before export (RandomMask2d)
        model.eval()(torch.zeros(1, 3, 16, 16))
    if method == "random_mask":
        for layer in model.modules():
            if isinstance(layer, RandomMask2d):
                layer.backend = backend
    return model


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("method,backend", _cases(EXPORTED_METHODS, EXPORT_BACKENDS))
def test_model_exports(method, backend, strict):
    """torch.export.export of a SmallCNN with each method, on each kernel backend, in both tracing modes,
    the batch size a dynamic dimension. The eval program is the eval model: the same logits, bit for bit.
    The training program draws its masks from torch's generator when it runs, as the eager model does:
    under the same torch.manual_seed the same logits, bit for bit, at another batch size and with other
    targets than it was exported with, and other logits under another seed."""
    model = _exported_model(method, backend)
    data = torch.Generator().manual_seed(1)
    x, other_x = torch.randn(4, 3, 16, 16, generator=data), torch.randn(6, 3, 16, 16, generator=data)
    target, other_target = torch.randint(0, 10, (4,), generator=data), torch.randint(0, 10, (6,), generator=data)
    step = _TrainingStep(model)
    batch = torch.export.Dim("batch", min=2, max=64)
    dynamic_shapes = {"x": {0: batch}, "y": {0: batch}}

    def export(module):
        return torch.export.export(module, (x, target), dynamic_shapes=dynamic_shapes, strict=strict).module()

    exported_eval = export(step.eval())
    assert_same_bits(exported_eval(other_x, other_target), step(other_x, other_target))

    exported_train = export(step.train())
    assert any("robustdrop" in str(node.target) for node in exported_train.graph.nodes)
    outputs = {}
    for seed in (5, 6):
        torch.manual_seed(seed)
        outputs[seed] = exported_train(other_x, other_target)
        torch.manual_seed(seed)
        assert_same_bits(outputs[seed], step(other_x, other_target))
    assert method == "random_mask" or not torch.equal(outputs[5], outputs[6])


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
@pytest.mark.parametrize("layer_class", [DropBlock2d, ActiveDropBlock2d])
def test_per_sample_normalisation_keeps_the_batch_dynamic(layer_class, backend):
    """normalize="sample" normalises each of the N samples on its own: N groups, a number that stays
    symbolic. torch.export with a dynamic batch works, torch.compile(dynamic=True) makes one graph for
    every batch size, and both give eager's bits under the same torch.manual_seed."""
    layer = (DropBlock2d(0.3, 3, normalize="sample", backend=backend) if layer_class is DropBlock2d
             else ActiveDropBlock2d(3, policies=(0.1, 0.3), normalize="sample", backend=backend))
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(layer, (torch.randn(4, 4, 9, 11),), dynamic_shapes={"x": {0: batch}}).module()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="aot_eager")
    for rows in (3, 5, 6):
        x = torch.randn(rows, 4, 9, 11)
        torch.manual_seed(rows)
        expected = layer(x)
        for run in (program, compiled):
            torch.manual_seed(rows)
            assert_same_bits(run(x), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", EXPORT_BACKENDS)
def test_cam_drop_default_top_k_follows_dynamic_map_sizes(backend):
    """CamDrop's default spatial top-k, max(1, round(H*W / bs**2)), follows a symbolic H and W: torch.export
    with dynamic H and W works, torch.compile(dynamic=True) makes one graph for maps of every size, and both
    give eager's bits under the same torch.manual_seed."""
    layer = CamDrop2d(0.3, 3, nn.Linear(CHANNELS, CLASSES), backend=backend)
    target = torch.tensor([0, 3])
    # W >= 9: the bit-packed mask's ceil(W/8) columns are then more than one, a layout torch guards on.
    height, width = torch.export.Dim("height", min=4, max=64), torch.export.Dim("width", min=9, max=64)
    program = torch.export.export(layer, (torch.randn(2, CHANNELS, 9, 11), target),
                                  dynamic_shapes={"x": {2: height, 3: width}, "target": None}).module()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="aot_eager")
    for size in ((10, 12), (7, 13), (16, 16)):
        x = torch.randn(2, CHANNELS, *size)
        torch.manual_seed(size[0])
        expected = layer(x, target)
        for run in (program, compiled):
            torch.manual_seed(size[0])
            assert_same_bits(run(x, target), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("method", EXPORTED_METHODS)
def test_fx_symbolic_trace_keeps_each_layer_as_one_node(method):
    """torch.fx.symbolic_trace (torchvision's create_feature_extractor, FX quantization) keeps a robustdrop
    layer as one call_module node, as torch.nn's own layers: the traced module runs the layer itself, so it
    follows train and eval mode and draws its masks when it runs, the model's bits under the same seed."""
    model = _exported_model(method, "auto").train()
    traced = torch.fx.symbolic_trace(model)
    traced.method = model.method  # for _TrainingStep
    layers = {name for name, module in model.named_modules()
              if isinstance(module, METHOD_LAYERS + (FeatureDensityDropout1d,))}
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert layers and layers <= called
    data = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 10, (4,), generator=data)
    step, traced_step = _TrainingStep(model), _TrainingStep(traced)
    for mode in ("train", "eval"):
        getattr(step, mode)(), getattr(traced_step, mode)()
        torch.manual_seed(3)
        expected = step(x, target)
        torch.manual_seed(3)
        assert_same_bits(traced_step(x, target), expected)


@pytest.mark.parametrize("root", ["layer", "model"])
@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_unbuilt_random_mask_export_is_a_clear_error(strict, root):
    """A RandomMask2d exported before its mask is built is an error that says what to do, not a program that
    rebuilds the mask at every call and leaves a fake tensor in the module; the module still builds its own
    mask at the next eager forward, exported alone or inside a model."""
    layer = RandomMask2d(0.5, seed=7)
    module = layer if root == "layer" else nn.Sequential(nn.Conv2d(4, 4, 1), layer)
    x = torch.randn(2, 4, 8, 8)
    hooks = torch.nn.modules.module._global_buffer_registration_hooks
    hooks_before = len(hooks)
    with pytest.raises(Exception, match="run one eager forward, or pass shape=, before .*torch.export"):
        torch.export.export(module, (x,), strict=strict)
    assert layer.mask is None and layer.packed_mask.numel() == 0
    if len(hooks) > hooks_before and root == "layer":
        # torch 2.11's non-strict export leaves its buffer-assignment hook registered when the traced forward
        # raises (later torch removes it in a finally): every later buffer assignment on the exported root
        # module fails, whatever the module. A RandomMask2d inside a model is not that root.
        pytest.xfail("torch leaked non-strict export's buffer-assignment hook for the root module")
    module(x)
    assert torch.equal(layer.mask, RandomMask2d(0.5, seed=7, shape=(4, 8, 8)).mask)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_reference_training_export_is_a_clear_error(strict):
    """The reference backend reads a drawn seed as a Python int: its training forward cannot be exported,
    and the error names the backend and what to do instead."""
    layer = DropBlock2d(0.2, 3, backend="reference")
    with pytest.raises(Exception, match="backend='reference' reads a drawn seed"):
        torch.export.export(layer, (torch.randn(2, 4, 8, 8),), strict=strict)
    exported = torch.export.export(layer.eval(), (torch.randn(2, 4, 8, 8),), strict=strict).module()
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(exported(x), x)  # eval is the identity, exported on any backend


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MAP_LAYERS + ["fdd1d"])
def test_torchscript_is_refused_with_a_clear_error(name):
    """TorchScript is not supported: torch.jit.script of a layer, or of a model holding one, says so and
    names the layer, instead of a compiler error inside it."""
    layer, _ = _layer(name, "reference")
    for module in (layer, nn.Sequential(nn.Identity(), nn.Sequential(layer))):
        with pytest.raises(RuntimeError, match=f"{type(layer).__name__} does not support TorchScript"):
            torch.jit.script(module)


class _ClassifierHolder(nn.Module):
    """A CamDrop2d and the classifier it reads, as a model holds them."""

    def __init__(self, drop: CamDrop2d):
        super().__init__()
        self.drop, self.classifier = drop, drop.classifier

    def forward(self, x):
        return self.drop(x)


@pytest.mark.skipif(EMULATED_CUDA, reason="the emulated CUDA ops have no meta kernels")
@pytest.mark.parametrize("backend", [name for name in available_backends("cpu") if name != "reference"])
def test_meta_tensors_run_on_a_backend_named_explicitly(backend):
    """Meta tensors (shapes only) take any kernel backend named explicitly, as they take "auto": every op
    has a fake implementation. (The reference computes FDD's PCA on values, which meta tensors lack.)"""
    x = torch.empty(2, CHANNELS, 8, 8, device="meta", requires_grad=True)
    weight, target = torch.empty(CLASSES, CHANNELS, device="meta"), torch.empty(2, dtype=torch.int64, device="meta")
    outputs = [robustdrop.drop_block2d(x, 0.2, 3, backend=backend),
               robustdrop.cam_drop2d(x, weight, target, 0.2, 3, backend=backend),
               robustdrop.feature_density_dropout(x, backend=backend)]
    assert all(y.device.type == "meta" and y.shape == x.shape for y in outputs)
    (grad,) = torch.autograd.grad(sum(y.sum() for y in outputs), x)
    assert grad.device.type == "meta" and grad.shape == x.shape


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["drop_block", "active_drop_block", "cam_drop", "fdd2d", "fdd1d"])
def test_torch_jit_trace_of_a_random_draw_is_refused_with_a_clear_error(name):
    """torch.jit.trace would record a seed (or Active DropBlock's policy) drawn on the host as a constant,
    and the traced module would drop the same positions at every call: an error that says so. In eval
    mode the layers are the identity and trace; an explicit seed is traced as asked."""
    layer, target = _layer(name, "reference")
    if name == "cam_drop":  # a model holds the classifier, whose weight the trace then takes as a parameter
        layer = _ClassifierHolder(layer)
    x = torch.randn(4, CHANNELS) if name == "fdd1d" else torch.randn(4, CHANNELS, 8, 8)
    with cam_targets(layer, target) if target is not None else contextlib.nullcontext():
        with pytest.raises(RuntimeError, match="torch.jit.trace would record them as constants"):
            torch.jit.trace(layer, (x,), check_trace=False)
        traced = torch.jit.trace(layer.eval(), (x,), check_trace=False)
    assert torch.equal(traced(x), x)
    if name == "drop_block":
        seeded = torch.jit.trace(lambda t: robustdrop.drop_block2d(t, 0.3, 3, seed=5), (x,), check_trace=False)
        assert torch.equal(seeded(x), robustdrop.drop_block2d(x, 0.3, 3, seed=5))


def test_every_op_has_a_fake_implementation_and_a_vmap_rule():
    """Every op of the robustdrop library traces on fake tensors (torch.compile, torch.export): a fake
    implementation of its own, or a composite kernel made of ops that have one. Every functional op has
    a vmap rule of its own (robustdrop._vmap), not torch's fallback, which warns at every call."""
    names = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("robustdrop::")]
    assert "robustdrop::philox_uniform" in names or not robustdrop.backends()["cpu"].available
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    no_fake = [name for name in names
               if not has_kernel(name, "Meta") and not has_kernel(name, "CompositeExplicitAutograd")]
    assert not no_fake
    functional = [name for name in names
                  if not getattr(torch.ops.robustdrop, name.split("::")[1]).default._schema.is_mutable]
    no_vmap_rule = [name for name in functional if not has_kernel(name, "FuncTorchBatched")]
    assert functional and not no_vmap_rule


# ---------------------------------------------------------------- ONNX

def _onnx_session(path):
    onnxruntime = pytest.importorskip("onnxruntime")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _onnx_run(path, *inputs):
    session = _onnx_session(path)
    feeds = {argument.name: value.numpy() for argument, value in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _export_onnx(model, inputs, path, **options):
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation and progress notices
        program = torch.onnx.export(model, inputs, **options)
    if program is not None:  # the torch.export-based exporter returns the program; the older one wrote path
        program.save(str(path))


@pytest.mark.parametrize("method", models.METHODS)
def test_eval_model_exports_to_onnx(method, tmp_path):
    """torch.onnx.export (the torch.export-based exporter) of a SmallCNN with each method, in eval: the
    program runs in onnxruntime and gives the eval model's logits, within the rounding of onnxruntime's own
    convolutions. Random Mask's masks are initializers of the graph; the other methods are the identity."""
    torch.manual_seed(0)
    model = models.SmallCNN(method=method)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        model.eval()(x)  # Random Mask builds its masks at the first forward
        expected = model(x)
    _export_onnx(model, (x,), tmp_path / "model.onnx", dynamo=True)
    torch.testing.assert_close(_onnx_run(tmp_path / "model.onnx", x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["export", "torchscript"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_random_mask_exports_to_onnx_as_a_select(dynamo, inplace, tmp_path):
    """A RandomMask2d alone, through either ONNX exporter, in or out of place: the program gives the layer's
    output to the bit, for another batch size than the export's (a dynamic dimension), and Inf and NaN at
    dropped positions stay out of it (a select, not a multiply)."""
    layer = RandomMask2d(0.4, seed=3, shape=(4, 5, 11), inplace=inplace)
    x = torch.randn(2, 4, 5, 11)
    options = ({"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamo else
               {"f": str(tmp_path / "mask.onnx"), "input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}})
    _export_onnx(layer, (x.clone(),), tmp_path / "mask.onnx", dynamo=dynamo, **options)
    other = torch.randn(5, 4, 5, 11)
    other[:, ~layer.mask] = float("inf")
    other[0, ~layer.mask] = float("nan")
    expected = layer(other.clone())
    assert torch.equal(expected[:, ~layer.mask], torch.zeros_like(expected[:, ~layer.mask]))
    assert_same_bits(_onnx_run(tmp_path / "mask.onnx", other), expected)


@pytest.mark.parametrize("dynamo", [True, False], ids=["export", "torchscript"])
def test_unbuilt_random_mask_onnx_export_is_a_clear_error(dynamo, tmp_path):
    """A RandomMask2d whose mask is not built yet: either ONNX exporter gets the error that says what to do
    (the TorchScript tracer would otherwise fail on a traced shape), and the next eager forward builds the
    mask the seed gives."""
    layer = RandomMask2d(0.4, seed=3)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), layer)
    x = torch.randn(2, 4, 5, 11)
    options = {} if dynamo else {"f": str(tmp_path / "mask.onnx")}
    with pytest.raises(Exception, match="run one eager forward, or pass shape=, before .*torch.onnx.export"):
        _export_onnx(model, (x,), tmp_path / "mask.onnx", dynamo=dynamo, **options)
    assert layer.mask is None
    model(x)
    assert torch.equal(layer.mask, RandomMask2d(0.4, seed=3, shape=(4, 5, 11)).mask)


def test_training_forward_does_not_export_to_onnx(tmp_path):
    """A mask drawn at every step has no ONNX form: the TorchScript-based exporter asked to keep training mode
    gets robustdrop's error, which says to export in eval mode; the torch.export-based exporter names the op
    it cannot translate."""
    pytest.importorskip("onnxscript")
    model = models.SmallCNN(method="dropblock").train()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(Exception, match=r"robustdrop::block_mask_forward draws a random mask.*model\.eval\(\)"):
        _export_onnx(model, (x,), tmp_path / "train.onnx", dynamo=False, f=str(tmp_path / "train.onnx"),
                     training=torch.onnx.TrainingMode.TRAINING)
    with pytest.raises(Exception, match="robustdrop.block_mask_forward"):
        _export_onnx(model, (x,), tmp_path / "train.onnx", dynamo=True)


# ---------------------------------------------------------------- torch.vmap

# vmap runs an op once per vmapped call (robustdrop._vmap) on the kernel backends; the reference's own
# torch code is not written for vmap (CamDrop's and FDD's scatter into new tensors, which vmap refuses).
VMAP_BACKENDS = EXPORT_BACKENDS
VMAPPED_CALLS = 3


def _vmapped_input(name: str) -> torch.Tensor:
    shape = (VMAPPED_CALLS, 4, CHANNELS) + (() if name == "fdd1d" else (8, 8))
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), requires_grad=True)


def _vmapped_forward(layer: nn.Module, xs: torch.Tensor, target: torch.Tensor | None, randomness: str, seed: int = 1):
    torch.manual_seed(seed)
    with cam_targets(layer, target) if target is not None else contextlib.nullcontext():
        return torch.vmap(layer, randomness=randomness)(xs)


@pytest.mark.parametrize("name,backend", _cases(MAP_LAYERS + ["fdd1d"], VMAP_BACKENDS))
def test_layer_under_vmap(name, backend):
    """torch.vmap over a training layer with randomness="same": each vmapped call is the layer's own
    call under the same torch.manual_seed (one seed drawn, as eager draws it), output and input gradient
    to the bit."""
    layer, target = _layer(name, backend)
    xs = _vmapped_input(name)
    ys = _vmapped_forward(layer, xs, target, "same")
    grad_ys = torch.randn(ys.shape, generator=torch.Generator().manual_seed(4))
    (grad_xs,) = torch.autograd.grad(ys, xs, grad_ys)
    for call in range(VMAPPED_CALLS):
        y = _forward(layer, xs[call], target, seed=1)
        (grad_x,) = torch.autograd.grad(y, xs, grad_ys[call])
        assert_same_bits(ys[call], y)
        assert_same_bits(grad_xs[call], grad_x[call])
    assert name == "random_mask" or not torch.equal(ys, xs)


@pytest.mark.parametrize("name,backend", _cases(MAP_LAYERS + ["fdd1d"], VMAP_BACKENDS))
def test_layer_under_vmap_draws_per_call(name, backend):
    """randomness="different": every vmapped call draws its own masks, so copies of one input come out
    different (Random Mask's fixed mask stays the same); vmap's default randomness="error" refuses the
    training forward's draw, as for torch.nn.Dropout, and runs the eval forward."""
    layer, target = _layer(name, backend)
    x = _vmapped_input(name)[0].detach()
    ys = _vmapped_forward(layer, x.expand(VMAPPED_CALLS, *x.shape), target, "different")
    differ = [not torch.equal(ys[0], ys[call]) for call in range(1, VMAPPED_CALLS)]
    assert differ == [name != "random_mask"] * (VMAPPED_CALLS - 1)
    if name != "random_mask":
        with pytest.raises(RuntimeError, match="randomness"):
            _vmapped_forward(layer, x.expand(VMAPPED_CALLS, *x.shape), target, "error")
    layer.eval()
    assert_same_bits(torch.vmap(layer)(x.expand(VMAPPED_CALLS, *x.shape))[1], layer(x))


@pytest.mark.parametrize("backend", VMAP_BACKENDS)
def test_seeded_ops_under_vmap_take_each_calls_seed(backend):
    """The vmap rule of a seeded op (its ``_drawn_seed`` variant, which a drawn seed goes through) gives
    every vmapped call its own input and seed: the same three outputs, to the bit, as one op call per
    (input, seed) pair."""
    suffix = "_triton" if backend == "triton" else ""
    xs = torch.randn(VMAPPED_CALLS, 2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([5, -7, 2**62 + 1])
    cases = [("block_mask_forward", (0.2, 3, False, True, 1e-6, None, 1), 1),
             ("feature_density_forward", (2, 3, -0.8, 0.9, True), 3)]
    for name, rest, seed_position in cases:
        op = getattr(torch.ops.robustdrop, name + suffix)
        variant = getattr(torch.ops.robustdrop, name + suffix + "_drawn_seed")

        def call(x, seed):
            args = (x,) + rest
            return variant(*args[:seed_position], seed, *args[seed_position:])

        outputs = torch.vmap(call)(xs, seeds)
        for index in range(VMAPPED_CALLS):
            args = (xs[index],) + rest
            expected = op(*args[:seed_position], int(seeds[index]), *args[seed_position:])
            for output, one in zip(outputs, expected):
                assert_same_bits(output[index], one)


@pytest.mark.parametrize("backend", VMAP_BACKENDS)
def test_vmap_over_zero_calls(backend):
    """vmap over a dimension of size 0 gives each op's outputs for zero calls: (0, *one call's shape), in
    the call's dtype, and the inputs their empty gradients."""
    x = torch.randn(0, 2, 4, 8, 8, dtype=torch.float16, requires_grad=True)
    for function in (lambda x: robustdrop.drop_block2d(x, 0.2, 3, backend=backend),
                     lambda x: robustdrop.feature_density_dropout(x, backend=backend),
                     lambda x: kl_distill(x.flatten(1).float(), x.flatten(1).float().detach(), reduction="none",
                                          backend=backend)):
        y = torch.vmap(function, randomness="different")(x)
        one_call = function(torch.randn(2, 4, 8, 8, dtype=torch.float16))
        assert y.shape == (0,) + one_call.shape and y.dtype == one_call.dtype
        (grad_x,) = torch.autograd.grad(y.sum(), x)
        assert grad_x.shape == x.shape


@pytest.mark.parametrize("backend", VMAP_BACKENDS)
def test_in_place_random_mask_under_vmap(backend):
    """RandomMask2d(inplace=True) under vmap writes the masked values into x, with their gradient."""
    layer = RandomMask2d(0.5, seed=3, inplace=True, backend=backend)
    xs = _vmapped_input("random_mask")
    hidden = xs * 1.0
    ys = torch.vmap(layer)(hidden)
    assert torch.equal(hidden, ys)
    grad_ys = torch.randn(ys.shape, generator=torch.Generator().manual_seed(4))
    (grad_xs,) = torch.autograd.grad(ys, xs, grad_ys)
    keep = layer.mask.expand(ys.shape)
    assert_same_bits(ys, torch.where(keep, xs, 0.0).detach())
    assert_same_bits(grad_xs, torch.where(keep, grad_ys, 0.0))


@pytest.mark.parametrize("method", ["dropblock", "random_mask"])
def test_model_ensemble_under_vmap(method):
    """An ensemble of SmallCNNs stacked with torch.func.stack_module_state and run by one vmapped
    functional_call, as torch.func's model-ensembling recipe does, trains with the method's layers:
    each member's logits and gradients are its own model's under the same torch.manual_seed (float64, to
    rounding: vmap runs the members' convolutions as one grouped convolution)."""
    torch.manual_seed(0)
    members = [models.SmallCNN(method=method).double() for _ in range(VMAPPED_CALLS)]
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for member in members:
            member.eval()(x)  # Random Mask builds its masks at the first forward
    for member in members:
        member.train()
    params, buffers = torch.func.stack_module_state(members)
    skeleton = copy.deepcopy(members[0]).to("meta")

    def member_logits(member_params, member_buffers, x):
        return torch.func.functional_call(skeleton, (member_params, member_buffers), (x,))

    torch.manual_seed(2)
    logits = torch.vmap(member_logits, in_dims=(0, 0, None), randomness="same")(params, buffers, x)
    stacked_grads = torch.autograd.grad(logits.square().sum(), list(params.values()))
    for index, member in enumerate(members):
        torch.manual_seed(2)
        member_logits_eager = member(x)
        torch.testing.assert_close(logits[index], member_logits_eager)
        grads = torch.autograd.grad(member_logits_eager.square().sum(), list(member.parameters()))
        for stacked, grad in zip(stacked_grads, grads):
            torch.testing.assert_close(stacked[index], grad)


# ---------------------------------------------------------------- torch.func's differentiating transforms

def _func_input(name: str, batch: int = 4) -> torch.Tensor:
    shape = (batch, CHANNELS) + (() if name == "fdd1d" else (8, 8))
    return torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


def _layer_function(layer: nn.Module, target: torch.Tensor | None, seed: int = 1):
    """x -> the layer's training forward under torch.manual_seed(seed), CamDrop with its targets."""
    def forward(x):
        return _forward(layer, x, target, seed=seed)

    return forward


@pytest.mark.parametrize("name,backend", _cases(MAP_LAYERS + ["fdd1d"], VMAP_BACKENDS + ["reference"]))
def test_layer_under_torch_func_grad_vjp_and_jvp(name, backend):
    """torch.func.grad and torch.func.vjp of a training layer, and grad of grad, give what autograd gives
    (backward and double backward with create_graph=True) under the same torch.manual_seed, to the bit;
    so does forward mode, torch.func.jvp: the layer is y = M x with M diagonal, so M v is the vjp of v."""
    layer, target = _layer(name, backend)
    layer.double()
    forward = _layer_function(layer, target)
    x = _func_input(name)
    grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def loss(x):
        return forward(x).square().sum()

    def grad_norm(x):
        return torch.func.grad(loss)(x).square().sum()

    leaf = x.clone().requires_grad_(True)
    y = forward(leaf)
    (grad_x,) = torch.autograd.grad(y, leaf, grad_y)
    (loss_grad,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
    (second,) = torch.autograd.grad(loss_grad.square().sum(), leaf)
    assert name == "random_mask" or not torch.equal(y, x)  # the layer dropped something
    assert_same_bits(torch.func.grad(loss)(x), loss_grad.detach())
    y_func, vjp = torch.func.vjp(forward, x)
    assert_same_bits(y_func, y.detach())
    assert_same_bits(vjp(grad_y)[0], grad_x)
    y_forward_mode, tangent = torch.func.jvp(forward, (x,), (grad_y,))
    assert_same_bits(y_forward_mode, y.detach())
    assert_same_bits(tangent, grad_x)
    assert_same_bits(torch.func.grad(grad_norm)(x), second)


@pytest.mark.parametrize("name,backend", _cases(["drop_block", "cam_drop", "fdd2d", "fdd1d", "random_mask"],
                                                VMAP_BACKENDS))
def test_per_sample_gradients_with_torch_func(name, backend):
    """torch.func's per-sample-gradient recipe, vmap(grad(loss of one sample)): with randomness="same"
    each sample's gradient is its own call's under the same torch.manual_seed; with "different" copies of
    one sample draw their own masks. jacrev of the layer is the diagonal matrix of its input gradient
    (y = keep * scale * x), and so is jacfwd."""
    layer, target = _layer(name, backend)
    layer.double()
    x = _func_input(name)

    def sample_loss(x_n, target_n):
        batch_target = None if target is None else target_n[None]
        return _forward(layer, x_n[None], batch_target).square().sum()

    targets = torch.zeros(x.shape[0], dtype=torch.long) if target is None else target
    per_sample = torch.vmap(torch.func.grad(sample_loss), randomness="same")(x, targets)
    for n in range(x.shape[0]):
        assert_same_bits(per_sample[n], torch.func.grad(sample_loss)(x[n], targets[n]))
    copies = torch.vmap(torch.func.grad(sample_loss), randomness="different")(x[:1].expand(3, *x.shape[1:]),
                                                                              targets[:1].expand(3))
    assert (name == "random_mask") == torch.equal(copies[0], copies[1])
    small = x[:1] if x.dim() == 2 else x[:1, :, :4, :4]
    layer, _ = _layer(name, backend)  # a new layer: Random Mask's mask is made for the first input's shape
    forward = _layer_function(layer.double(), None if target is None else target[:1])
    jacobian = torch.func.jacrev(forward)(small).reshape(small.numel(), small.numel())
    leaf = small.clone().requires_grad_(True)
    (diagonal,) = torch.autograd.grad(forward(leaf).sum(), leaf)
    assert_same_bits(jacobian, torch.diag(diagonal.flatten()))
    assert_same_bits(torch.func.jacfwd(forward, randomness="same")(small).reshape(jacobian.shape), jacobian)


@pytest.mark.parametrize("backend", VMAP_BACKENDS + ["reference"])
def test_functional_ops_under_torch_func_grad(backend):
    """The functional ops that no layer above covers: EWS's channel gate and kl_distill. kl_distill's kernels
    save their gradient as a constant, so under a torch.func transform that differentiates it runs its torch
    expression (the reference): torch.func.grad and its second derivative (hessian, forward over reverse
    mode) are the reference's."""
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 4, 4, generator=generator, dtype=torch.float64)
    keep = torch.rand(3, 5, generator=generator) < 0.5

    def gate_loss(x):
        return robustdrop.ews.channel_gate(x, keep, backend=backend).square().sum()

    assert_same_bits(torch.func.grad(gate_loss)(x), 2 * torch.where(keep[:, :, None, None], x, 0.0))
    student, teacher = (torch.randn(4, 7, generator=generator, dtype=torch.float64) for _ in range(2))

    def kl_loss(student, backend):
        return kl_distill(student, teacher, temperature=2.0, backend=backend)

    expected = torch.func.grad(kl_loss)(student, "reference")
    assert_same_bits(torch.func.grad(kl_loss)(student, backend), expected)
    leaf = student.clone().requires_grad_(True)
    (autograd_grad,) = torch.autograd.grad(kl_loss(leaf, backend), leaf)
    torch.testing.assert_close(expected, autograd_grad, rtol=1e-12, atol=1e-15)
    second = torch.func.hessian(kl_loss)(student, backend)
    assert_same_bits(second, torch.func.hessian(kl_loss)(student, "reference"))
    assert second.abs().sum() > 0


@pytest.mark.parametrize("backend", VMAP_BACKENDS + ["reference"])
def test_bad_rates_are_refused_under_torch_func(backend):
    """A tensor drop rate that a transform does not wrap (captured from outside, or made in the function)
    is read and checked under torch.func as in eager mode; a vmapped rate, one value per call, is not."""
    x = torch.randn(2, 3, 8, 8)
    captured = torch.tensor([1.5, 0.1])
    with pytest.raises(ValueError, match=r"p must hold drop rates in \[0, 1\]"):
        torch.func.grad(lambda t: robustdrop.drop_block2d(t, captured, 3, seed=0, backend=backend).sum())(x)
    with pytest.raises(ValueError, match=r"p must hold drop rates in \[0, 1\]"):
        torch.vmap(lambda t: robustdrop.drop_block2d(t, torch.tensor(-3.0), 3, seed=0, backend=backend))(x[None])
    mapped = torch.vmap(lambda t, q: robustdrop.drop_block2d(t, q, 3, seed=0, backend=backend))
    assert_same_bits(mapped(x[None], torch.tensor([0.2]))[0],
                     robustdrop.drop_block2d(x, torch.tensor(0.2), 3, seed=0, backend=backend))


# ---------------------------------------------------------------- CUDA graphs

@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="torch before 2.8 has no cudagraph_unsafe tag")
def test_drawn_seed_ops_run_outside_cuda_graphs():
    """The ``_drawn_seed`` ops read their seed on the host when they run: inside a CUDA graph that read
    would happen once, at recording, and every replay would drop the same positions. They are tagged
    cudagraph_unsafe, which Inductor reads (torch.compile(mode="reduce-overhead") runs them between its
    CUDA graphs): its check finds the op in a compiled DropBlock's graph."""
    names = [name for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("robustdrop::") and name.endswith("_drawn_seed")]
    assert names
    for name in names:
        assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.robustdrop, name.split("::")[1]).default.tags
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    forward_graphs = []

    def keep_forward_graph(graph_module, example_inputs):
        def forward_compiler(forward_graph, inputs):
            forward_graphs.append(forward_graph)
            return forward_graph

        return aot_module_simplified(graph_module, example_inputs, fw_compiler=forward_compiler)

    torch._dynamo.reset()
    layer = DropBlock2d(0.2, 3, backend=BACKENDS[0])
    torch.compile(layer, backend=keep_forward_graph, fullgraph=True)(torch.randn(2, 3, 8, 8, requires_grad=True))
    unsafe = get_first_incompatible_cudagraph_node(forward_graphs[0])
    assert unsafe is not None and str(unsafe.target).endswith("_drawn_seed.default")


def test_random_draw_while_capturing_a_cuda_graph_is_an_error(monkeypatch):
    """A seed drawn for a CUDA op (seed=None) or Active DropBlock's random policy, while a CUDA graph is
    being captured, is an error that says what to do: drawn once on the host, it would be replayed. An
    explicit seed is the caller's choice and passes; a CPU op never asks (the query would create a CUDA
    context)."""
    from robustdrop import _seed

    capturing = [True]
    asked = []

    def is_current_stream_capturing():
        asked.append(True)
        return capturing[0]

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", is_current_stream_capturing)
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match="reduce-overhead"):
        _seed.op_seed(None, cuda)
    with pytest.raises(RuntimeError, match="reduce-overhead"):
        ActiveDropBlock2d(3, policies=(0.1, 0.2))._eager_policy(cuda)
    assert _seed.op_seed(5, cuda) == 5
    asked.clear()
    assert isinstance(_seed.op_seed(None, torch.device("cpu")), int) and not asked
    capturing[0] = False
    assert isinstance(_seed.op_seed(None, cuda), int) and asked


# ---------------------------------------------------------------- no host wait on a GPU

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", MAP_LAYERS + ["fdd1d"])
def test_layer_forward_and_backward_never_wait_for_the_gpu(name, backend):
    """A training forward and backward on CUDA queues its work without the host waiting for the GPU
    (torch.cuda.set_sync_debug_mode("error")), so a training step runs ahead of the GPU. CamDrop's
    targets come from the CPU, as a DataLoader's labels: cam_targets checks them there and copies them
    to the GPU without a wait."""
    if not robustdrop.backends()[backend].available:
        pytest.skip(f"the {backend} backend is not available here")
    layer, target = _layer(name, backend)
    layer = layer.cuda()
    if name == "cam_drop":
        layer.classifier.cuda()  # referenced, not registered: the layer's .cuda() leaves it
    shape = (4, CHANNELS) if name == "fdd1d" else (4, CHANNELS, 12, 12)
    x = torch.randn(shape, device="cuda", requires_grad=True)
    grad_y = torch.randn(shape, device="cuda")
    _run(layer, x, target, grad_y)  # warm up: kernels compiled, a Random Mask's mask built
    with no_host_sync():
        y, grad_x = _run(layer, x, target, grad_y)
    assert y.shape == x.shape and grad_x.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cam_drop_reads_cuda_targets_once(backend):
    """CUDA targets are read once, where set_cam_targets checks them: the forwards of every CamDrop layer
    that uses them, and further calls of cam_drop2d with them, do not wait for the GPU."""
    if not robustdrop.backends()[backend].available:
        pytest.skip(f"the {backend} backend is not available here")
    layer, cpu_target = _layer("cam_drop", backend)
    layer.classifier.cuda()
    layers = nn.Sequential(layer, CamDrop2d(0.3, 3, layer.classifier, backend=backend)).cuda()
    x = torch.randn(4, CHANNELS, 12, 12, device="cuda", requires_grad=True)
    grad_y = torch.randn_like(x)
    _run(layers, x, cpu_target, grad_y)  # warm up
    target = cpu_target.cuda()
    set_cam_targets(layers, target)  # reads target: the one wait
    with no_host_sync():
        torch.manual_seed(2)
        (grad_x,) = torch.autograd.grad(layers(x), x, grad_y)
        robustdrop.cam_drop2d(x, layer.classifier.weight, target, 0.2, 3, backend=backend)
    assert grad_x.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_per_sample_cuda_rates_are_read_once(backend):
    """drop_block2d checks a CUDA tensor of per-sample rates by reading it once; calls with it unchanged
    do not wait for the GPU, and an in-place change is read (and checked) again."""
    if not robustdrop.backends()[backend].available:
        pytest.skip(f"the {backend} backend is not available here")
    x = torch.randn(4, CHANNELS, 12, 12, device="cuda", requires_grad=True)
    rates = torch.tensor([0.1, 0.2, 0.0, 0.3], device="cuda")
    robustdrop.drop_block2d(x, rates, 3, backend=backend)  # reads rates: the one wait
    with no_host_sync():
        torch.autograd.grad(robustdrop.drop_block2d(x, rates, 3, backend=backend).sum(), x)
    rates[1] = 1.5
    with pytest.raises(ValueError, match=r"p must hold drop rates in \[0, 1\]"):
        robustdrop.drop_block2d(x, rates, 3, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kl_distill_forward_and_backward_never_wait_for_the_gpu(backend):
    if not robustdrop.backends()[backend].available:
        pytest.skip(f"the {backend} backend is not available here")
    student = torch.randn(8, CLASSES, device="cuda", requires_grad=True)
    teacher = torch.randn(8, CLASSES, device="cuda")
    torch.autograd.grad(kl_distill(student, teacher, backend=backend), student)  # warm up
    with no_host_sync():
        (grad,) = torch.autograd.grad(kl_distill(student, teacher, backend=backend), student)
    assert grad.shape == student.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_of_a_drawn_seed_is_an_error():
    """The same, through torch.cuda.graph on a real capture."""
    x = torch.randn(2, 3, 8, 8, device="cuda")
    robustdrop.drop_block2d(x, 0.2, 3)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="reduce-overhead"):
        with torch.cuda.graph(graph):
            robustdrop.drop_block2d(x, 0.2, 3)
