"""The package: setup.py's extras, license, version and types, and the README it ships as its description."""
import glob
import os
import runpy

import pytest
import setuptools
import torch

import gift
from tests.helpers import ROOT


def test_packaging_declares_extras_license_version_and_types():
    captured = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        setuptools.setup = real_setup
        os.chdir(cwd)
    requires = captured["install_requires"]
    assert "torch>=2.3" in requires and not any(r.startswith(("triton", "peft", "matplotlib")) for r in requires)
    extras = captured["extras_require"]
    assert (
        extras["lora"] == ["peft>=0.10"]
        and extras["plots"] == ["matplotlib>=3.6"]
        and extras["triton"][0].startswith("triton")
    )
    assert set(extras["lora"] + extras["plots"] + extras["triton"]) <= set(extras["dev"])
    assert captured["version"] == gift.__version__ and captured["license"] == "MIT"
    assert captured["author"] and captured["url"]
    assert captured["entry_points"]["console_scripts"] == ["gift=gift.app.cli:main"]
    assert "py.typed" in captured["package_data"]["gift"] and os.path.isfile(os.path.join(ROOT, "gift", "py.typed"))
    assert "MIT License" in open(os.path.join(ROOT, "LICENSE")).read()
    from gift.app.recipes import recipe_names  # the recipes ship inside the package, and what reads them

    assert {f"recipes/{n}.yaml" for n in recipe_names()} <= {os.path.relpath(p, os.path.join(ROOT, "gift")) for pat in
                                                             captured["package_data"]["gift"]
                                                             for p in glob.glob(os.path.join(ROOT, "gift", pat))}
    assert any(r.startswith("pyyaml") for r in requires)
    assert hasattr(torch.amp, "GradScaler")  # the loop's torch.amp.GradScaler(device): why torch>=2.3


@pytest.mark.parametrize("readme", [os.path.join(ROOT, "README.md")])
def test_readme_says_how_to_get_a_local_weights_file(readme):
    text = open(readme, encoding="utf-8").read()
    assert "Getting a local weights file for a timm model" in text and "--pretrained-file" in text
