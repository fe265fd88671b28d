"""`gift eval` (gift.app.commands.eval): a saved adapter on exactly its recorded backbone scores what training
measured; an adapter on another backbone or a missing pretrained file is refused in one line."""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from gift.app.cli import main
from tests.helpers import finetune_run


def test_adapter_on_a_random_backbone_explains_identically_and_evaluates_to_its_val_accuracy(tmp_path, capsys):
    out = finetune_run(tmp_path, "run", "--epochs", "1")
    assert "starts from a random initialisation" in capsys.readouterr().err  # the warning line
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    for name in ("png1", "png2"):
        torch.manual_seed(len(name) + (name == "png2"))  # another global RNG state each time: must not matter
        assert main(["explain", "--adapter", os.path.join(out, "adapter"), "--image", str(image),
                     "--out", str(tmp_path / name)]) == 0
    files = sorted(os.listdir(tmp_path / "png1"))
    assert files and files == sorted(os.listdir(tmp_path / "png2"))
    assert all((tmp_path / "png1" / f).read_bytes() == (tmp_path / "png2" / f).read_bytes() for f in files)
    # gift eval on the saved adapter: exactly the last epoch's validation accuracy
    assert main(["eval", "--adapter", os.path.join(out, "adapter"), "--eval-split", "val"]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert result["top1"] == history[-1]["val_top1"] and result["top5"] == history[-1]["val_top5"] == 1.0
    assert result["num_images"] == 32 and result["split"] == "val"
    # an adapter whose recorded backbone has other shapes is refused in one line
    wrong = tmp_path / "wrong"
    shutil.copytree(os.path.join(out, "adapter"), wrong)
    meta = json.loads((wrong / "gift_config.json").read_text())
    meta["run"]["backbone"]["timm_name"] = "vit_tiny_patch16_224"
    (wrong / "gift_config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["eval", "--adapter", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wrong backbone model" in err


def test_lora_run_saves_a_peft_adapter_that_evaluates_to_its_val_accuracy(tmp_path):
    out = finetune_run(tmp_path, "lora", "--epochs", "1", "--method", "lora", "--rank", "4")
    assert {"adapter_model.safetensors", "adapter_config.json", "gift_run.json"} <= set(
        os.listdir(os.path.join(out, "adapter"))
    )
    assert main(["eval", "--adapter", os.path.join(out, "adapter")]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["top1"] == json.load(open(os.path.join(out, "metrics.json")))[-1]["val_top1"]
    assert result["method"] == "lora" and result["trainable_parameters"] > 0


def test_adapter_on_a_pretrained_file_needs_that_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from gift.backbones import create_backbone

    weights = tmp_path / "w.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_backbone("gift_vit_micro_patch4_32", 4).state_dict().items()}, weights
    )
    out = finetune_run(tmp_path, "run", "--epochs", "1", "--pretrained-file", str(weights))
    assert "random initialisation" not in capsys.readouterr().err
    adapter = os.path.join(out, "adapter")
    moved = tmp_path / "moved.safetensors"
    os.replace(weights, moved)
    assert main(["eval", "--adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert "'w.safetensors'" in err and "--pretrained-file" in err
    assert main(["eval", "--adapter", adapter, "--pretrained-file", str(moved)]) == 0
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    assert main(["eval", "--adapter", adapter, "--pretrained-file", str(tmp_path / "other.pt")]) == 2
    assert "is not the file the adapter was trained on" in capsys.readouterr().err
