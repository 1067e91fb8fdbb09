"""robustdrop: fused kernels for structured and guided dropout.

Every op runs on four backends (``robustdrop.backends()`` tells which are
available here) that compute the same function, bit for bit, from the same
seed. Importing works without the compiled extension or Triton: ops then run
on the PyTorch reference, after one warning.
"""
from robustdrop import _backend, _vmap
from robustdrop._backend import BackendStatus, backends
from robustdrop._seed import rank_seeding, set_rank_seeding
from robustdrop.ops import block_mask as _block_mask
from robustdrop.ops import cam_mask as _cam_mask
from robustdrop.ops import feature_density as _feature_density
from robustdrop.ops import fixed_mask as _fixed_mask
from robustdrop.ops import kl_distill as _kl_distill
from robustdrop.ops import _philox
from robustdrop.ops.block_mask import drop_block2d
from robustdrop.ops.cam_mask import cam_drop2d
from robustdrop.ops.feature_density import feature_density, feature_density_dropout
from robustdrop.ops.fixed_mask import fixed_mask2d, pack_fixed_mask

__version__ = "0.1.0"
__all__ = [
    "backends", "BackendStatus", "drop_block2d", "cam_drop2d", "feature_density", "feature_density_dropout", "fixed_mask2d",
    "pack_fixed_mask", "apply_random_mask", "convert", "set_rank_seeding", "rank_seeding", "nn", "models", "training", "attacks", "ews",
    "__version__",
]


def _register_ops() -> None:
    """Fake implementations for the ops this install has, autograd for the Triton ops and, for
    every op, a vmap rule (robustdrop._vmap).

    The compiled ops (CPU and CUDA kernels) have their autograd in C++
    (csrc/autograd), registered when robustdrop._C imports.
    """
    if _backend.extension_error() is None:
        _block_mask.register("block_mask_forward", "block_mask_backward", autograd=False)
        _cam_mask.register("cam_mask_forward", "block_mask_backward", autograd=False)
        _feature_density.register("feature_density", "feature_density_forward", "channel_mask_backward",
                                  autograd=False)
        _fixed_mask.register("fixed_mask_apply", autograd=False)
        _kl_distill.register("kl_distill_forward", autograd=False)
        _philox.register("philox_uniform", "philox_words")
    else:
        _backend.warn_fallback(_backend.extension_error())
    if _backend.triton_error() is None:
        _block_mask.register("block_mask_forward_triton", "block_mask_backward_triton", autograd=True)
        _cam_mask.register("cam_mask_forward_triton", "block_mask_backward_triton", autograd=True)
        _feature_density.register("feature_density_triton", "feature_density_forward_triton",
                                  "channel_mask_backward_triton", autograd=True)
        _fixed_mask.register("fixed_mask_apply_triton", autograd=True)
        _kl_distill.register("kl_distill_forward_triton", autograd=True)
    _vmap.register_loop_rules()


_register_ops()

from robustdrop import nn  # noqa: E402  (the modules use the ops registered above)
from robustdrop import attacks, ews, training  # noqa: E402
from robustdrop import models  # noqa: E402
from robustdrop.nn.random_mask import apply_random_mask  # noqa: E402
from robustdrop.convert import convert  # noqa: E402
