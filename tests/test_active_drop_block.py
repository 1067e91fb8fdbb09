"""Active DropBlock (the paper's Eq. 5-6 and Algorithm 1): the layer and the training step."""
import pytest
import torch
from torch import nn

import robustdrop
from robustdrop.nn import ActiveDropBlock2d
from robustdrop.nn.active_drop_block import DEFAULT_POLICIES
from robustdrop.training import active_dropblock_step
from conftest import DEVICE_BACKENDS, no_host_sync


def tiny_model(policies=DEFAULT_POLICIES, backend="auto", bn_after=True, **options):
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
              ActiveDropBlock2d(3, policies=policies, backend=backend, **options),
              nn.Conv2d(8, 8, 3, padding=1)]
    if bn_after:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)]
    return nn.Sequential(*layers).train()


def batch(n=4, size=12):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def test_default_pool_is_the_papers():
    layer = ActiveDropBlock2d(4)
    assert layer.policies == (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.225)
    assert "block_size=4" in repr(layer) and "policies=" in repr(layer)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_layer_is_drop_block_at_its_policy_and_identity_in_eval(device, backend):
    x = torch.randn(2, 3, 12, 12, device=device)
    layer = ActiveDropBlock2d(3, backend=backend)
    layer.policy = 0.2
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    assert torch.equal(y, robustdrop.drop_block2d(x, 0.2, 3, backend=backend))
    assert layer.last_policy == 0.2
    assert layer.eval()(x) is x


def test_layer_draws_a_policy_from_the_pool_repeatably():
    x = torch.randn(2, 3, 12, 12)
    layer = ActiveDropBlock2d(3, policies=(0.1, 0.2, 0.3))
    torch.manual_seed(1)
    first = [(layer(x), layer.last_policy) for _ in range(6)]
    torch.manual_seed(1)
    again = [(layer(x), layer.last_policy) for _ in range(6)]
    assert [rate for _, rate in first] == [rate for _, rate in again]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert {rate for _, rate in first} <= {0.1, 0.2, 0.3}


def test_change_threshold_repicks_until_x_changes_enough():
    x = torch.rand(2, 3, 16, 16) + 1.0
    layer = ActiveDropBlock2d(3, policies=(0.0, 0.3), change_threshold=0.05)
    layer.policy = 0.0  # no drop: x unchanged, so Algorithm 1 picks another rate
    y = layer(x)
    assert layer.last_policy == 0.3 and not torch.equal(y, x)
    unreachable = ActiveDropBlock2d(3, policies=(0.0, 0.1, 0.3), change_threshold=100.0)
    unreachable.policy = 0.1
    unreachable(x)
    assert unreachable.last_policy == 0.3  # none reaches it: the largest change is kept
    plain = ActiveDropBlock2d(3, policies=(0.0, 0.3))
    plain.policy = 0.0
    assert torch.equal(plain(x), x) and plain.last_policy == 0.0  # off by default


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_batched_layer_masks_each_copy_with_its_own_policy(device, backend):
    policies = (0.0, 0.1, 0.3)
    layer = ActiveDropBlock2d(5, policies=policies, backend=backend)
    layer.batched_policies = True
    x = torch.ones(3 * 8, 4, 32, 32, device=device)
    y = layer(x)
    assert layer.last_policy is None
    copies = y.view(3, 8, 4, 32, 32)
    assert torch.equal(copies[0], x[:8])  # rate 0, normalised on its own: untouched
    for k, rate in enumerate(policies):
        # DropBlock's overlapping blocks drop a little less than p: compare with a plain call at that rate.
        plain = robustdrop.drop_block2d(x[:8], rate, 5, seed=k, backend=backend)
        dropped, plain_dropped = ((t == 0).double().mean().item() for t in (copies[k], plain))
        assert abs(dropped - plain_dropped) < 0.03, (rate, dropped, plain_dropped)
        kept = (copies[k] != 0).sum().item()
        assert torch.allclose(copies[k][copies[k] != 0], torch.tensor(8 * 4 * 32 * 32 / kept, device=device))
    with pytest.raises(ValueError, match="len\\(policies\\) = 3 equal copies"):
        layer(torch.ones(4, 4, 8, 8, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_layer_on_a_gpu_does_not_wait_for_it():
    """The per-copy rates reach the GPU by a copy the host does not wait for (a pageable copy would
    synchronise), and the masks are the CPU backend's, bit for bit, for the same seed."""
    layer = ActiveDropBlock2d(3, policies=(0.0, 0.1, 0.3))
    layer.batched_policies = True
    x = torch.randn(3 * 4, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    x_gpu = x.cuda()
    torch.manual_seed(7)
    with no_host_sync():
        y = layer(x_gpu)
    torch.manual_seed(7)
    assert torch.equal(y.cpu(), layer(x))


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_step_returns_the_largest_loss_with_its_graph(mode):
    torch.manual_seed(0)
    model = tiny_model()
    inputs, targets = batch()
    step = active_dropblock_step(model, nn.functional.cross_entropy, inputs, targets, mode=mode)
    assert step.losses.shape == (10,) and not step.losses.requires_grad
    assert step.policy_index == int(torch.argmax(step.losses))
    assert step.policy == DEFAULT_POLICIES[step.policy_index]
    assert torch.equal(step.loss.detach(), step.losses.max())
    assert step.loss.requires_grad
    step.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for layer in model.modules():
        if isinstance(layer, ActiveDropBlock2d):
            assert layer.policy is None and layer.step_policy_index is None and not layer.batched_policies


def test_step_evaluates_the_pool_over_a_fixed_policy_and_keeps_it():
    """A rate fixed on the layer gives way to the step's policies during the step and holds again after it."""
    torch.manual_seed(0)
    model = tiny_model(policies=(0.0, 0.5, 0.9))
    layer = model[3]
    layer.policy = 0.5
    inputs, targets = batch(8, 16)
    step = active_dropblock_step(model, nn.functional.cross_entropy, inputs, targets)
    assert len(set(step.losses.tolist())) == 3
    assert layer.policy == 0.5 and layer.step_policy_index is None
    model(inputs)
    assert layer.last_policy == 0.5


def test_step_policies_differ_in_loss():
    torch.manual_seed(0)
    model = tiny_model(policies=(0.0, 0.5, 0.9))
    inputs, targets = batch(8, 16)
    step = active_dropblock_step(model, nn.functional.cross_entropy, inputs, targets)
    assert len(set(step.losses.tolist())) == 3


def test_sequential_step_updates_buffers_once():
    """BatchNorm statistics end as after one forward, not one per policy."""
    torch.manual_seed(0)
    model = tiny_model(bn_after=False)  # the one BatchNorm sits before the ActDB layer: the same statistics each time
    reference = tiny_model(bn_after=False)
    reference.load_state_dict(model.state_dict())
    inputs, targets = batch()
    active_dropblock_step(model, nn.functional.cross_entropy, inputs, targets)
    reference(inputs)
    bn, bn_reference = model[1], reference[1]
    assert bn.num_batches_tracked.item() == 1
    assert torch.equal(bn.running_mean, bn_reference.running_mean)
    assert torch.equal(bn.running_var, bn_reference.running_var)


class SampleCounter(nn.Module):
    """Counts the training samples it sees in a buffer that each forward assigns anew, as many
    modules update a buffer (self.n = self.n + k), not in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_batch", None)

    def forward(self, x):
        if self.training:
            self.seen = self.seen + x.shape[0]
            self.last_batch = torch.tensor(x.shape[0])
        return x


def test_sequential_step_keeps_buffers_a_forward_assigns():
    """A buffer the chosen forward assigns (instead of updating it in place), or sets where it was None,
    ends as that forward left it: as after one plain forward."""
    torch.manual_seed(0)
    model = tiny_model(policies=(0.0, 0.3))
    counter = SampleCounter()
    model.insert(1, counter)
    inputs, targets = batch()
    for _ in range(3):
        active_dropblock_step(model, nn.functional.cross_entropy, inputs, targets).loss.backward()
    assert int(counter.seen) == 3 * 4 and int(counter.last_batch) == 4
    assert set(dict(model.named_buffers())) >= {"1.seen", "1.last_batch"}


def test_sequential_step_builds_a_random_mask_at_its_first_forward():
    """A RandomMask2d built at the first forward, inside the step, keeps the mask that forward built
    (its buffers are assigned, not updated in place), and plain forwards work after the step."""
    torch.manual_seed(0)
    model = robustdrop.apply_random_mask(robustdrop.models.SmallCNN(method="active_dropblock"), 0.5, seed=1)
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    step = active_dropblock_step(model, nn.functional.cross_entropy, images, labels)
    step.loss.backward()
    built = robustdrop.apply_random_mask(robustdrop.models.SmallCNN(), 0.5, seed=1)
    built(images)
    masks = {name: buffer for name, buffer in model.named_buffers() if name.endswith("mask")}
    expected = {name: buffer for name, buffer in built.named_buffers() if name.endswith("mask")}
    assert masks.keys() == expected.keys() and masks
    assert all(torch.equal(masks[name], expected[name]) for name in masks)
    model(images)


def test_sequential_step_that_raises_leaves_the_buffers_as_they_were():
    torch.manual_seed(0)
    model = tiny_model(policies=(0.0, 0.2, 0.4))
    bn = model[1]
    held = bn.running_mean
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    calls = []

    def failing_loss(outputs, targets):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("loss failed")
        return nn.functional.cross_entropy(outputs, targets)

    inputs, targets = batch()
    with pytest.raises(RuntimeError, match="loss failed"):
        active_dropblock_step(model, failing_loss, inputs, targets)
    assert bn.running_mean is held
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    assert model[3].step_policy_index is None
    model(inputs)
    assert not torch.equal(held, before["1.running_mean"])  # later forwards update the tensor held


def test_sequential_step_with_repicks_reports_the_rates_the_chosen_forward_applied():
    """With change_threshold a layer may re-pick in any of the step's forwards (Algorithm 1): the step's
    policy names the pool entry it asked for, and each layer's last_policy is the rate it applied in the
    chosen forward, not in the last one the step ran."""
    inputs, targets = batch(4, 12)
    found = False
    for seed in range(20):
        torch.manual_seed(seed)
        model = tiny_model(policies=(0.0, 0.3, 0.6), change_threshold=0.05)
        layer = model[3]
        applied = []
        layer.register_forward_hook(lambda module, args, output: applied.append(module.last_policy))
        step = active_dropblock_step(model, nn.functional.cross_entropy, inputs, targets)
        assert len(applied) == 3
        assert layer.last_policy == applied[step.policy_index]
        assert applied[0] != 0.0  # the policy 0.0 changes nothing: always re-picked
        found = found or applied[step.policy_index] != applied[-1]
    assert found, "no seed chose a forward whose rate differs from the last forward's"


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_step_picks_a_nan_loss_as_torch_argmax_does(mode):
    """A NaN loss is the largest in both modes, as in torch.argmax and torch.max: a diverged policy is not
    hidden behind a finite one."""
    torch.manual_seed(0)
    model = tiny_model(policies=(0.0, 0.2, 0.4))
    inputs, targets = batch()
    calls = []

    def loss_with_nan(outputs, targets):
        losses = nn.functional.cross_entropy(outputs, targets, reduction="none")
        calls.append(1)
        return (losses * (torch.nan if len(calls) == 2 else 1.0)).mean()  # policy 1's (a slice, in batched mode)

    step = active_dropblock_step(model, loss_with_nan, inputs, targets, mode=mode)
    assert step.policy_index == int(torch.argmax(step.losses)) == 1
    assert step.loss.isnan() and step.losses.max().isnan()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_step_on_every_backend(device, backend):
    torch.manual_seed(0)
    model = tiny_model(policies=(0.0, 0.2, 0.4), backend=backend).to(device)
    inputs, targets = batch()
    for mode in ("sequential", "batched"):
        step = active_dropblock_step(model, nn.functional.cross_entropy, inputs.to(device), targets.to(device),
                                     mode=mode)
        assert torch.equal(step.loss.detach(), step.losses.max())
        step.loss.backward()


def test_step_bad_input_is_a_clear_error():
    inputs, targets = batch()
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="model has no ActiveDropBlock2d"):
        active_dropblock_step(nn.Sequential(nn.Flatten(), nn.Linear(432, 5)), loss, inputs, targets)
    with pytest.raises(ValueError, match="mode must be one of"):
        active_dropblock_step(tiny_model(), loss, inputs, targets, mode="parallel")
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        active_dropblock_step(tiny_model(), lambda out, y: out, inputs, targets)
    with pytest.raises(ValueError, match="mode='batched' does not re-pick"):
        active_dropblock_step(tiny_model(change_threshold=0.1), loss, inputs, targets, mode="batched")
    two_pools = nn.Sequential(tiny_model(policies=(0.1, 0.2)), ActiveDropBlock2d(3, policies=(0.1,)))
    with pytest.raises(ValueError, match="policy pool of one length"):
        active_dropblock_step(two_pools, loss, inputs, targets)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        active_dropblock_step(tiny_model(), loss, [inputs], targets)


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_step_outside_training_mode_is_a_clear_error(mode):
    """In eval mode the layers are the identity: every policy would give the same loss and policy 0.0."""
    inputs, targets = batch()
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"needs model in training mode.*model.training = False, .*\['3'\]"):
        active_dropblock_step(tiny_model().eval(), loss, inputs, targets, mode=mode)
    model = tiny_model()
    model[3].eval()  # one ActiveDropBlock2d left in eval mode
    with pytest.raises(ValueError, match=r"model.training = True, ActiveDropBlock2d layers in eval mode: \['3'\]"):
        active_dropblock_step(model, loss, inputs, targets, mode=mode)
    model = tiny_model()
    model.eval()
    model[3].train()  # the layer alone in training mode: the model is still evaluating
    with pytest.raises(ValueError, match=r"model.training = False, ActiveDropBlock2d layers in eval mode: \[\]"):
        active_dropblock_step(model, loss, inputs, targets, mode=mode)
    with pytest.raises(ValueError, match="needs model in training mode"):
        active_dropblock_step(ActiveDropBlock2d(3).eval(), lambda out, y: out.mean(), inputs, targets, mode=mode)
    model = tiny_model()
    model[1].eval()  # a frozen BatchNorm is fine: only the model and its ActiveDropBlock2d layers must train
    step = active_dropblock_step(model, loss, inputs, targets, mode=mode)
    assert len(set(step.losses.tolist())) > 1


@pytest.mark.parametrize("bad,error,message", [
    (dict(policies=()), ValueError, "policies must hold at least one drop rate"),
    (dict(policies=(0.1, 1.5)), ValueError, r"policies must be in \[0, 1\]"),
    (dict(policies=0.1), TypeError, "policies must be a sequence"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(change_threshold=0.0), ValueError, "change_threshold must be > 0"),
    (dict(change_threshold="big"), TypeError, "change_threshold must be a real number"),
    (dict(normalize="sum"), ValueError, "normalize must be one of"),
    (dict(couple_channels="y"), TypeError, "couple_channels must be a bool"),
    (dict(couple_channels=None), TypeError, "couple_channels must be a bool"),
    (dict(eps=float("inf")), ValueError, "eps must be finite"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_layer_bad_arguments_are_clear_errors(bad, error, message):
    args = dict(block_size=3)
    args.update(bad)
    with pytest.raises(error, match=message):
        ActiveDropBlock2d(args.pop("block_size"), **args)
