"""The README's Quickstart, executed as written but for a ViT-Ti on 32 x 32 images whose weights file stands in
for the ViT-B/16 one (offline)."""
import os
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from gift.adapters import load_gift_adapter

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def quickstart() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert block is not None, "README.md has no Quickstart python block"
    code = block.group(1)
    swaps = [('"vit_base_patch16_224", num_classes=100,', '"vit_tiny_patch16_224", num_classes=100, img_size=32,'),
             ("224, 224", "32, 32"), ("num_clusters=64", "num_clusters=8")]
    for old, new in swaps:
        assert code.count(old) == 1, f"the Quickstart changed: {old!r} is not in it once"
        code = code.replace(old, new)
    return code


def test_readme_quickstart_runs_and_its_adapter_reloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    weights = timm.create_model("vit_tiny_patch16_224", num_classes=100, img_size=32).state_dict()
    save_file(weights, "vit_b16.safetensors")
    namespace: dict = {}
    exec(compile(quickstart(), "README.md Quickstart", "exec"), namespace)
    assert "trainable total" in capsys.readouterr().out
    assert namespace["maps"].maps[11].shape == (8, 8, 2, 2)
    reloaded, deployable, images = namespace["model"], namespace["deployable"], namespace["images"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(images), deployable.eval()(images), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(reloaded.backbone.head.weight, weights["head.weight"])  # the head was trained


def test_an_adapter_of_a_backbone_from_python_names_what_it_lacks(tmp_path):
    from gift import FastGIFT, GIFTConfig

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    FastGIFT(backbone, GIFTConfig(rank=8, num_clusters=4)).save_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"not loaded from a local file.*backbone=\.\.\."):
        load_gift_adapter(tmp_path)
    torch.manual_seed(1)
    other = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    with pytest.raises(ValueError, match="does not have the frozen weights"):
        load_gift_adapter(tmp_path, backbone=other)
    torch.manual_seed(0)
    same = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)
    assert load_gift_adapter(tmp_path, backbone=same).backbone is same
