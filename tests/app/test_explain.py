"""``gift explain``: PNG cluster maps for a saved adapter, and its one-line errors."""
import json
import os
import shutil

import numpy as np
from PIL import Image

from gift.app.cli import main


def test_explain_command_writes_pngs_and_refuses_bad_input(tmp_path, capsys):
    assert main(["finetune", "--train-size", "64", "--val-size", "32", "--batch-size", "32", "--epochs", "1", "--quiet",
                 "--output", str(tmp_path / "run")]) == 0
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert main(["explain", "--adapter", str(tmp_path / "run" / "adapter"), "--image", str(image), "--out",
                 str(tmp_path / "png"), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    files = sorted(os.listdir(tmp_path / "png"))
    assert "img_grid.png" in files and "img_layer3_segmentation.png" in files
    assert sum(f.startswith("img_layer0_cluster") for f in files) == 2
    assert all(Image.open(tmp_path / "png" / f).format == "PNG" for f in files)
    assert "img_grid.png" in out
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert main(["explain", "--adapter", str(tmp_path / "run" / "adapter"), "--image", str(tmp_path / "bad.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    wrong = tmp_path / "wrong"  # an adapter whose recorded backbone is another model
    shutil.copytree(tmp_path / "run" / "adapter", wrong)
    meta = json.loads((wrong / "gift_config.json").read_text())
    meta["run"]["backbone"]["timm_name"] = "vit_tiny_patch16_224"
    (wrong / "gift_config.json").write_text(json.dumps(meta))
    assert main(["explain", "--adapter", str(wrong), "--image", str(image)]) == 2
    assert "wrong backbone model" in capsys.readouterr().err
    assert (
        main(["explain", "--adapter", str(tmp_path / "run" / "adapter"), "--image", str(image), "--layers", "9"]) == 2
    )
    assert "layer index 9 is out of range" in capsys.readouterr().err
