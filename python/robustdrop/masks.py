"""``python -m robustdrop masks``: one PNG of what each method drops on the same input.

One image (a scikit-learn handwritten digit when scikit-learn is installed,
else a synthetic ring and stroke) goes through the first two stages of a
randomly initialised ``robustdrop.models.SmallCNN`` (fixed seed, eval mode),
giving a feature map x (1, 64, 16, 16). On that x the figure shows:

* DropBlock (``drop_block2d``): the keep mask of one channel and its output;
* CamDrop (``cam_drop2d`` with the model's classifier and its predicted class):
  the CAM, its spatial candidates (the top-k positions where blocks may start),
  one draw's keep mask, and how often each position is dropped over 32 draws
  (in the candidate channels);
* FDD-2D (``feature_density``, ``feature_density_dropout``): the 64 channels
  on their two principal axes with the 5 x 5 grid, coloured by their cell's drop
  probability (dropped ones crossed), and the channels per cell;
* Random Mask (``nn.RandomMask2d``): the fixed (C, H, W) mask's first four channels;
* EWS (``ews.GatedNetwork(...).random_subnet``): which channels of each gated
  layer a sampled subnet keeps.

Masks are read off each op's gradient (``dx = keep ? scale : 0`` with scale >
0), so they are exactly what the op computed. Every draw uses a seed derived
from ``--seed``; the same seed gives the same figure.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

HELP = "save one PNG showing what DropBlock, CamDrop, FDD, Random Mask and an EWS subnet drop on the same input"

IMAGE_SIZE = 32
DROPBLOCK = {"p": 0.2, "block_size": 4}
CAMDROP = {"p": 0.3, "block_size": 4}
CAMDROP_DRAWS = 32
FDD_DIMS = 2
RANDOM_MASK_RATIO = 0.5
RANDOM_MASK_CHANNELS = 4
EWS_WIDTH = 0.7
# Each draw's seed is --seed plus its offset, so the methods' draws are independent of one another.
SEED_OFFSETS = {"dropblock": 1, "camdrop": 2, "fdd": 3, "random_mask": 4, "ews": 5}
MAX_SEED = 2**31

TITLES = (
    "feature map x, channel {channel}",
    "DropBlock keep mask (p={p}, block {block_size})",
    "DropBlock output, channel {channel}",
    "CamDrop: CAM of class {target}",
    "CamDrop: candidate positions (top {spatial_topk})",
    "CamDrop keep mask (p={p}, block {block_size}), channel {channel}",
    "CamDrop: drop frequency over {draws} draws",
    "FDD-2D: channels on the top-2 PCA axes",
    "FDD-2D: channels per cell (drop probability)",
    "Random Mask (ratio {ratio}): channels 0-{last}",
    "EWS subnet (width {width}): kept channels",
)


def input_image(*, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, str]:
    """(image (1, 1, size, size) float32 in [0, 1], its description): a scikit-learn digit, else a synthetic one."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return synthetic_image(size=size), "synthetic ring and stroke"
    digits = load_digits()
    index = 0
    pixels = torch.tensor(digits.images[index], dtype=torch.float32)[None, None] / 16.0  # 8 x 8, values 0..16
    image = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return image.clamp(0.0, 1.0), f"scikit-learn digit {int(digits.target[index])}"


def synthetic_image(*, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(1, 1, size, size) float32 in [0, 1]: a ring and a diagonal stroke with soft (Gaussian) edges."""
    coordinates = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5  # pixel centres in [-0.5, 0.5)
    row, col = torch.meshgrid(coordinates, coordinates, indexing="ij")
    ring = torch.exp(-(((row**2 + col**2).sqrt() - 0.28) / 0.05) ** 2)
    stroke_distance = (row - col) / math.sqrt(2.0)  # distance to the diagonal row = col
    stroke = torch.exp(-(stroke_distance / 0.04) ** 2) * (row.abs() < 0.4)
    return torch.maximum(ring, stroke)[None, None]


def feature_model(seed: int, device: torch.device):
    """A SmallCNN for 1-channel images, initialised from ``seed`` without touching the global RNG, in eval mode."""
    from robustdrop.models import SmallCNN

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(10, in_channels=1)
    return model.to(device).eval()


def keep_mask(op, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool, y) of a dropout op on x, the keep mask read off the gradient: dx = keep ? scale : 0, scale > 0."""
    x = x.detach().requires_grad_(True)
    y = op(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return grad != 0, y.detach()


def compute_masks(*, seed: int = 0, device: str = "cpu") -> dict:
    """Every mask the figure shows, as CPU tensors, from one input and ``seed``.

    Keys: image (1, 1, 32, 32), description, x (1, C, H, W) = (1, 64, 16, 16),
    target (the predicted class); dropblock_keep and dropblock_y (1, C, H, W);
    cam (1, H, W), cam_spatial (1, H, W) and cam_channel (1, C) candidates,
    spatial_topk, camdrop_keep (CAMDROP_DRAWS, C, H, W); fdd_cell (1, C),
    fdd_counts and fdd_p (1, 25), fdd_coordinates (1, C, 2), fdd_keep (1, C);
    random_mask (C, H, W); ews_layers (names) and ews_keep (one (C_j,) per layer).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    device = torch.device(device)
    image, description = input_image()
    model = feature_model(seed, device)
    with torch.no_grad():
        normalized = ((image - 0.5) / 0.5).to(device)
        x = model.layer2(model.layer1(normalized))  # (1, 64, 16, 16)
        target = model(normalized).argmax(1)  # the predicted class picks the CAM
    out = {"image": image, "description": description, "x": x, "target": int(target)}
    out.update(_dropblock_masks(x, seed + SEED_OFFSETS["dropblock"]))
    out.update(_camdrop_masks(x, model.fc.weight.detach(), target, seed + SEED_OFFSETS["camdrop"]))
    out.update(_fdd_masks(x, seed + SEED_OFFSETS["fdd"]))
    out.update(_random_mask(x.shape[1:], seed + SEED_OFFSETS["random_mask"]))
    out.update(_ews_subnet(model, seed + SEED_OFFSETS["ews"]))
    return {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value for key, value in out.items()}


def _dropblock_masks(x: torch.Tensor, seed: int) -> dict:
    import robustdrop

    keep, y = keep_mask(lambda t: robustdrop.drop_block2d(t, DROPBLOCK["p"], DROPBLOCK["block_size"], seed=seed), x)
    return {"dropblock_keep": keep, "dropblock_y": y}


def _camdrop_masks(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, seed: int) -> dict:
    """The CAM and candidates as DESIGN.md 4.2 defines them (the reference's steps), and CamDrop's keep masks."""
    import robustdrop
    from robustdrop.reference import cam_mask as cam_reference

    _, channels, height, width = x.shape
    block = min(CAMDROP["block_size"], height, width)
    spatial_topk = cam_reference.default_spatial_topk(height, width, block)
    channel_topk = cam_reference.default_channel_topk(channels)
    class_weights = cam_reference.class_channel_weights(weight, target, channels)  # (1, C): the paper's Eq. 7
    spatial, channel = cam_reference.cam_candidates(x, weight, target, spatial_topk, channel_topk)
    # CAMDROP_DRAWS copies of the sample draw independent masks in one call (each sample has its own RNG
    # indices); copy 0 is what a call on x alone draws.
    copies, targets = x.repeat(CAMDROP_DRAWS, 1, 1, 1), target.expand(CAMDROP_DRAWS)
    keep, _ = keep_mask(lambda t: robustdrop.cam_drop2d(t, weight, targets, CAMDROP["p"], CAMDROP["block_size"],
                                                        seed=seed), copies)
    return {"cam": cam_reference.class_activation_map(x, class_weights), "cam_spatial": spatial,
            "cam_channel": channel, "spatial_topk": spatial_topk, "camdrop_keep": keep}


def _fdd_masks(x: torch.Tensor, seed: int) -> dict:
    """The density grid of feature_density, the PCA coordinates behind it, and which channels FDD drops."""
    import robustdrop
    from robustdrop.reference import feature_density as fdd_reference

    cell, counts = robustdrop.feature_density(x, FDD_DIMS)
    keep, _ = keep_mask(lambda t: robustdrop.feature_density_dropout(t, FDD_DIMS, seed=seed), x)
    return {"fdd_cell": cell, "fdd_counts": counts,
            "fdd_coordinates": fdd_reference.feature_coordinates(x, FDD_DIMS),
            "fdd_p": fdd_reference.drop_probabilities(counts, -0.8, 0.9),  # feature_density_dropout's defaults
            "fdd_keep": keep.flatten(2).any(2)}  # a kept channel has gradient 1 everywhere


def _random_mask(shape: torch.Size, seed: int) -> dict:
    import robustdrop

    layer = robustdrop.nn.RandomMask2d(RANDOM_MASK_RATIO, shape=tuple(shape), seed=seed)
    return {"random_mask": layer.mask}


def _ews_subnet(model, seed: int) -> dict:
    """A uniformly random subnet of the model's gated layers (its batch norms): one of those EWS's controller
    searches among for weak ones."""
    from robustdrop.ews import GatedNetwork

    subnet = GatedNetwork(model, width=EWS_WIDTH).random_subnet(torch.Generator().manual_seed(seed))
    names = list(subnet.channels)
    return {"ews_layers": names, "ews_keep": [subnet.channels[name].cpu() for name in names]}


def masks_figure(*, seed: int = 0, device: str = "cpu"):
    """The matplotlib Figure of ``python -m robustdrop masks`` (3 x 4 panels); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    computed = compute_masks(seed=seed, device=device)
    fig, axes = plt.subplots(3, 4, figsize=(16, 12.5))
    axes = axes.flatten()
    channel = int(computed["x"][0].flatten(1).mean(1).argmax())  # the most active channel
    _image(axes[0], computed["image"][0, 0], f"input: {computed['description']}", cmap="gray")
    _image(axes[1], computed["x"][0, channel], TITLES[0].format(channel=channel))
    _image(axes[2], computed["dropblock_keep"][0, channel], TITLES[1].format(**DROPBLOCK), cmap="gray", vmin=0, vmax=1)
    _image(axes[3], computed["dropblock_y"][0, channel], TITLES[2].format(channel=channel))
    _camdrop_panels(axes[4:8], computed)
    _fdd_scatter(axes[8], computed)
    _fdd_grid(axes[9], computed)
    _random_mask_panel(axes[10], computed["random_mask"])
    _ews_panel(axes[11], computed)
    fig.suptitle(f"robustdrop: what each method drops on the same feature map x {tuple(computed['x'].shape)} "
                 f"(SmallCNN stages 1-2, seed {seed}; white = kept, black = dropped)")
    fig.tight_layout()
    return fig


def _image(ax, values: torch.Tensor, title: str, **options) -> None:
    ax.imshow(values.float().numpy(), interpolation="nearest", **options)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _camdrop_panels(axes, computed: dict) -> None:
    """CAM, its candidates over it, one draw's keep mask, and how often each position is dropped."""
    cam, spatial = computed["cam"][0], computed["cam_spatial"][0]
    _image(axes[0], cam, TITLES[3].format(target=computed["target"]), cmap="inferno")
    _image(axes[1], cam, TITLES[4].format(spatial_topk=computed["spatial_topk"]), cmap="inferno")
    rows, cols = spatial.nonzero(as_tuple=True)
    axes[1].scatter(cols.numpy(), rows.numpy(), s=30, facecolors="none", edgecolors="cyan", linewidths=1.5)
    keep = computed["camdrop_keep"]  # (draws, C, H, W)
    channel = int((~keep[0]).flatten(1).sum(1).argmax())  # the channel of draw 0 that loses most
    _image(axes[2], keep[0, channel], TITLES[5].format(channel=channel, **CAMDROP), cmap="gray", vmin=0, vmax=1)
    candidates = computed["cam_channel"][0]
    frequency = (~keep[:, candidates]).float().mean((0, 1))  # over draws and candidate channels
    _image(axes[3], frequency, TITLES[6].format(draws=keep.shape[0]), cmap="Reds", vmin=0)
    axes[3].figure.colorbar(axes[3].images[0], ax=axes[3], fraction=0.046, pad=0.04,
                            label="fraction of candidate channels dropped")


def _fdd_scatter(ax, computed: dict) -> None:
    """Channels on the two principal axes, the equal grid between min and max, colour = drop probability."""
    f = computed["fdd_coordinates"][0]  # (C, 2)
    p = computed["fdd_p"][0][computed["fdd_cell"][0]]  # (C,) each channel's cell's drop probability
    kept = computed["fdd_keep"][0]
    grids = round(computed["fdd_counts"].shape[1] ** (1 / FDD_DIMS))
    for axis, line in ((0, ax.axvline), (1, ax.axhline)):
        low, high = float(f[:, axis].min()), float(f[:, axis].max())
        for k in range(grids + 1):
            line(low + (high - low) * k / grids, color="lightgray", linewidth=0.8, zorder=0)
    points = ax.scatter(f[kept, 0].numpy(), f[kept, 1].numpy(), c=p[kept].numpy(), cmap="viridis", vmin=0, vmax=1,
                        s=25, label="kept")
    ax.scatter(f[~kept, 0].numpy(), f[~kept, 1].numpy(), c=p[~kept].numpy(), cmap="viridis", vmin=0, vmax=1,
               marker="x", s=40, label="dropped")
    ax.figure.colorbar(points, ax=ax, fraction=0.046, pad=0.04, label="drop probability of the cell")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(TITLES[7], fontsize=10)
    ax.set_xlabel("principal axis 1", fontsize=8)
    ax.set_ylabel("principal axis 2", fontsize=8)


def _fdd_grid(ax, computed: dict) -> None:
    """The grids x grids cells: channel counts as colour and text, with each cell's drop probability."""
    counts, p = computed["fdd_counts"][0], computed["fdd_p"][0]
    grids = round(counts.shape[0] ** (1 / FDD_DIMS))
    # cell = b_1 + grids * b_2: rows of the picture are b_2 (axis 2), columns b_1 (axis 1), axis 2 upwards.
    grid = counts.view(grids, grids)
    ax.imshow(grid.float().numpy(), origin="lower", cmap="Blues", interpolation="nearest")
    for b2 in range(grids):
        for b1 in range(grids):
            cell = b2 * grids + b1
            dark = int(counts[cell]) > int(counts.max()) / 2  # white text on the darker half of the colour scale
            ax.text(b1, b2, f"{int(counts[cell])}\n{float(p[cell]):.2f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_title(TITLES[8], fontsize=10)
    ax.set_xlabel("bin on axis 1", fontsize=8)
    ax.set_ylabel("bin on axis 2", fontsize=8)


def _random_mask_panel(ax, mask: torch.Tensor) -> None:
    """The first four channels of the (C, H, W) keep mask as a 2 x 2 mosaic, a gap between them."""
    shown = mask[:RANDOM_MASK_CHANNELS].float()
    gap_column = torch.full((shown.shape[1], 1), float("nan"))
    rows = [torch.cat([shown[2 * r], gap_column, shown[2 * r + 1]], 1) for r in range(RANDOM_MASK_CHANNELS // 2)]
    gap_row = torch.full((1, rows[0].shape[1]), float("nan"))
    mosaic = torch.cat([rows[0], gap_row, rows[1]], 0)
    _image(ax, mosaic, TITLES[9].format(ratio=RANDOM_MASK_RATIO, last=shown.shape[0] - 1), cmap=_gray_with_grey_nan(),
           vmin=0, vmax=1)


def _ews_panel(ax, computed: dict) -> None:
    """One row per gated layer: kept (white) and removed (black) channels; grey beyond the layer's width."""
    widths = [keep.numel() for keep in computed["ews_keep"]]
    matrix = torch.full((len(widths), max(widths)), float("nan"))
    for row, keep in enumerate(computed["ews_keep"]):
        matrix[row, :keep.numel()] = keep.float()
    cmap = _gray_with_grey_nan()
    ax.imshow(matrix.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(widths)))
    ax.set_yticklabels([f"{name} ({int(keep.sum())}/{keep.numel()})"
                        for name, keep in zip(computed["ews_layers"], computed["ews_keep"])], fontsize=8)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_title(TITLES[10].format(width=EWS_WIDTH), fontsize=10)


def _gray_with_grey_nan():
    import matplotlib

    return matplotlib.colormaps["gray"].with_extremes(bad="0.75")  # NaN (no channel, a gap) in light grey


def _seed_argument(text: str) -> int:
    seed = int(text)
    if not 0 <= seed < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**31), got {seed}")
    return seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="masks.png", metavar="PATH", help="the PNG to write (default: masks.png)")
    parser.add_argument("--seed", type=_seed_argument, default=0,
                        help="seed of the model and of every mask, in [0, 2**31) (default: 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the ops run (default: cpu)")


def main(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("python -m robustdrop masks needs matplotlib (pip install matplotlib)")
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch")
        return 1
    import matplotlib.pyplot as plt

    fig = masks_figure(seed=args.seed, device=args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # as bench makes its --out
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(args.out)
    return 0
