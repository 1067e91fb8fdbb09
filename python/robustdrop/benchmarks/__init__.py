"""Benchmark cases, one module per op (``python -m robustdrop bench`` finds them all).

To add an op's cases, add one module here (its name, e.g. ``cam_mask``, is
what ``--ops`` accepts, as are the op names in ``OP``) defining:

* ``OP``: the public op name (a string, or a tuple of them);
* ``cases(config: robustdrop.benchmark.BenchConfig) -> list[robustdrop.benchmark.Case]``:
  the cases for ``config.device`` / ``config.dtype``, small ones when
  ``config.quick``. Each Case gives the naive baseline (the reference's
  algorithm with torch's own RNG), the robustdrop call per backend and any
  optional anchors (``robustdrop.benchmark.Anchor``; import the outside
  library inside the anchor's ``build`` so a missing one is only skipped),
  and the issue's speed or memory targets for the case, if any
  (``robustdrop.benchmark.Target``: the run reports each as met or not).

The harness adds the rest: the backends that run on the device, torch.compile
of the naive baseline, the ``torch.mul(x, 2.0)`` speed of light, the timing,
the saved-tensor measurement and the outputs. ``block_mask.py`` is the model.
"""
