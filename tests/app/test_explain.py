"""``gift explain``: PNG cluster maps for a saved adapter, and its one-line errors."""
import json
import os
import shutil

import numpy as np
from PIL import Image

from gift.app.cli import main


def test_explain_command_writes_pngs_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the failing calls below use the default --out, runs/explain
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
    assert not os.path.exists(tmp_path / "runs")  # a call that fails writes nothing, not even its --out folder


def test_images_of_one_name_in_different_folders_keep_their_own_pngs(tmp_path, capsys):
    assert main(["finetune", "--train-size", "32", "--val-size", "16", "--batch-size", "16", "--epochs", "1",
                 "--quiet", "--rank", "4", "--num-clusters", "4", "--output", str(tmp_path / "run")]) == 0
    images = []
    for folder, value in (("cat", 20), ("dog", 200)):
        os.makedirs(tmp_path / folder)
        images.append(str(tmp_path / folder / "0.png"))
        Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(images[-1])
    capsys.readouterr()
    assert main(["explain", "--adapter", str(tmp_path / "run" / "adapter"), "--image", *images, images[0],
                 "--out", str(tmp_path / "png"), "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    files = sorted(os.listdir(tmp_path / "png"))
    assert [f for f in files if f.endswith("_grid.png")] == ["cat_0_2_grid.png", "cat_0_grid.png", "dog_0_grid.png"]
    assert f"wrote {len(files)} PNG files" in out and out.count("_grid.png") == 3
    cat, dog = (np.asarray(Image.open(tmp_path / "png" / f"{stem}_layer0_segmentation.png")) for stem in ("cat_0",
                                                                                                        "dog_0"))
    assert cat.shape == dog.shape  # both written, neither over the other


def test_a_damaged_adapter_file_is_one_line_naming_it(tmp_path, capsys):
    assert main(["finetune", "--train-size", "32", "--val-size", "16", "--batch-size", "16", "--epochs", "1",
                 "--quiet", "--rank", "4", "--num-clusters", "4", "--output", str(tmp_path / "run")]) == 0
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    adapter = tmp_path / "run" / "adapter"
    weights, config = adapter / "gift_adapter.safetensors", adapter / "gift_config.json"
    whole_weights, whole_config = weights.read_bytes(), config.read_text()
    for damaged, content, needle in ((weights, whole_weights[:len(whole_weights) // 2], "cannot read GIFT checkpoint"),
                                     (weights, b"\0" * 64, "cannot read GIFT checkpoint"),
                                     (config, whole_config[:len(whole_config) // 2], "is damaged: not valid JSON")):
        weights.write_bytes(whole_weights)
        config.write_text(whole_config)
        damaged.write_bytes(content) if isinstance(content, bytes) else damaged.write_text(content)
        for command in (["eval", "--adapter", str(adapter)],
                        ["explain", "--adapter", str(adapter), "--image", str(image), "--out", str(tmp_path / "m")]):
            capsys.readouterr()
            assert main(command) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and needle in err and damaged.name in err, err
