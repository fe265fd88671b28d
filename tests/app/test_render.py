"""gift.app.render: the explainer's PNGs (overlays, segmentation, grid) and the training curves."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gift.app.render import curves_unavailable, heat, palette, unique_stems, write_curves, write_pngs
from gift.explainer import ClusterMaps


def test_palette_colours_are_distinct_and_heat_runs_from_dark_blue_to_yellow():
    colours = palette(7)
    assert colours.shape == (7, 3) and colours.dtype == np.uint8 and len({tuple(c) for c in colours}) == 7
    assert heat(np.array([0.0])).tolist() == [[0, 0, 80]] and heat(np.array([1.0])).tolist() == [[255, 230, 0]]
    assert heat(np.array([-1.0, 2.0])).tolist() == [[0, 0, 80], [255, 230, 0]]  # clipped to [0, 1]


def test_every_png_of_an_image_is_written_with_its_size(tmp_path):
    maps = torch.rand(1, 3, 8, 8)
    result = ClusterMaps(grid=(2, 2), maps={0: maps}, segmentation={0: maps.argmax(1)})
    image = np.zeros((8, 8, 3), np.uint8)
    written = write_pngs([image], result, str(tmp_path / "out"), ["a.png"], top_k=2)
    names = {os.path.basename(p) for p in written}
    assert len(names) == 4 and "a_layer0_segmentation.png" in names and "a_grid.png" in names
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)
    assert Image.open(tmp_path / "out" / "a_layer0_segmentation.png").size == (8, 8)
    assert Image.open(tmp_path / "out" / "a_grid.png").size == (4 * 8 * 32, 8 * 32)  # 4 tiles, scaled to 256 px


def test_training_curves_are_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="curves need the plots extra")
    assert curves_unavailable() is None
    write_curves(str(tmp_path / "curves.png"), [{"epoch": 1, "train_loss": 1.0, "val_top1": 0.5},
                                                 {"epoch": 2, "train_loss": 0.5, "val_top1": 0.75}])
    assert Image.open(tmp_path / "curves.png").format == "PNG"


def test_unique_stems_never_give_two_images_one_stem():
    assert unique_stems(["cat/0.png", "dog/0.png"]) == ["cat_0", "dog_0"]
    # a file given twice gets a suffix, which must not be the stem of another file given
    assert unique_stems(["d/0.png", "d/0.png", "d/0_2.png"]) == ["0", "0_3", "0_2"]
    assert unique_stems(["d/0_2.png", "d/0.png", "d/0.png", "d/0.jpg"]) == ["0_2", "0", "0_3", "0_4"]
