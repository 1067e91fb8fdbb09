"""``python -m robustdrop masks``: the figure of what each method drops, and the masks behind it.

The masks are checked against the ops' specifications (the reference
implementations and the counts DESIGN.md 4.4 fixes), so the figure shows what
the ops compute.
"""
import argparse
import math
import struct
import sys

import pytest
import torch

from robustdrop import __main__ as command_line
from robustdrop import masks
from robustdrop.ews import kept_count
from robustdrop.reference import block_mask, cam_mask, feature_density

PANEL_TITLES = [
    "input: ", "feature map x, channel ", "DropBlock keep mask (p=0.2, block 4)", "DropBlock output, channel ",
    "CamDrop: CAM of class ", "CamDrop: candidate positions (top 16)", "CamDrop keep mask (p=0.3, block 4), channel ",
    "CamDrop: drop frequency over 32 draws", "FDD-2D: channels on the top-2 PCA axes",
    "FDD-2D: channels per cell (drop probability)", "Random Mask (ratio 0.5): channels 0-3",
    "EWS subnet (width 0.7): kept channels",
]


@pytest.fixture(scope="module")
def computed():
    return masks.compute_masks(seed=0)


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as file:
        header = file.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_masks_command_writes_one_png_with_every_panel(computed, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    assert command_line.COMMANDS["masks"] == "robustdrop.masks"
    figures, results = [], []
    original_figure, original_compute = masks.masks_figure, masks.compute_masks

    def recording_figure(**options):
        figures.append(original_figure(**options))
        return figures[-1]

    def recording_compute(**options):
        results.append(original_compute(**options))
        return results[-1]

    monkeypatch.setattr(masks, "masks_figure", recording_figure)
    monkeypatch.setattr(masks, "compute_masks", recording_compute)
    parser = argparse.ArgumentParser()
    masks.add_arguments(parser)
    out = tmp_path / "figures" / "masks.png"  # a folder that does not exist yet is made, as bench makes --out
    assert masks.main(parser.parse_args(["--out", str(out), "--seed", "0"])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == (1600, 1250)
    assert out.stat().st_size > 50_000
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_title()]
    assert len(titles) == len(PANEL_TITLES)
    for title, expected in zip(titles, PANEL_TITLES):
        assert title.startswith(expected)
    assert_same_masks(results[0], computed)  # the same seed, the same figure


def assert_same_masks(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        elif key == "ews_keep":
            assert len(actual[key]) == len(value) and all(torch.equal(a, b) for a, b in zip(actual[key], value))
        else:
            assert actual[key] == value, key


def test_masks_are_what_the_ops_drop(computed):
    x = computed["x"]
    assert x.shape == (1, 64, 16, 16)
    n, c, h, w = x.shape
    # DropBlock: the keep mask read off the gradient is the specification's, and the output is zero off it.
    bs = masks.DROPBLOCK["block_size"]
    gamma = block_mask.drop_rate_to_gamma(masks.DROPBLOCK["p"], h, w, bs)
    expected = block_mask.block_keep_mask(x.shape, masks.SEED_OFFSETS["dropblock"], gamma, bs, False)
    assert torch.equal(computed["dropblock_keep"], expected)
    assert 0 < (~expected).sum() < expected.numel()
    assert torch.all(computed["dropblock_y"][~expected] == 0)
    # CamDrop: draw 0 is the specification's mask for x alone; no draw drops outside the candidate channels.
    spatial, channel = computed["cam_spatial"], computed["cam_channel"]
    assert spatial.sum() == computed["spatial_topk"] == 16 and channel.sum() == 8
    gamma = block_mask.drop_rate_to_gamma(masks.CAMDROP["p"], h, w, bs)
    expected = cam_mask.cam_keep_mask(x.shape, masks.SEED_OFFSETS["camdrop"], gamma, bs, spatial, channel)
    keep = computed["camdrop_keep"]
    assert keep.shape == (masks.CAMDROP_DRAWS, c, h, w)
    assert torch.equal(keep[:1], expected)
    assert torch.all(keep[:, ~channel[0]])
    assert (~keep).any()
    # FDD: every channel sits in one of the 25 cells; the dropped channels are the specification's draw.
    cell, counts = computed["fdd_cell"], computed["fdd_counts"]
    assert counts.shape == (1, 25) and counts.sum() == c
    expected, _ = feature_density.channel_keep_mask(cell, counts, masks.SEED_OFFSETS["fdd"], -0.8, 0.9)
    assert torch.equal(computed["fdd_keep"], expected)
    assert (~expected).any() and expected.any()
    # Random Mask: exactly round(ratio * H * W) positions dropped in every channel.
    dropped_per_channel = (~computed["random_mask"]).flatten(1).sum(1)
    assert torch.all(dropped_per_channel == round(masks.RANDOM_MASK_RATIO * h * w))
    # EWS: every gated layer keeps ceil(width * C_j) channels.
    assert computed["ews_layers"] == ["layer1.bn", "layer2.bn", "layer3.bn", "layer4.bn"]
    for keep in computed["ews_keep"]:
        assert keep.sum() == kept_count(masks.EWS_WIDTH, keep.numel()) == math.ceil(0.7 * keep.numel())


def test_synthetic_image_is_used_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    image, description = masks.input_image()
    assert description == "synthetic ring and stroke"
    assert image.shape == (1, 1, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert torch.equal(image, masks.synthetic_image())
    assert image[0, 0, 16, 16] > 0.9  # the stroke crosses the centre


def test_seed_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="seed must be an int in"):
        masks.compute_masks(seed=-1)
