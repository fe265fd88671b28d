"""gift.app.errors: bad input and missing extras as one line."""
import os

from gift.app.cli import main
from tests.helpers import TINY, finetune_run


def test_missing_extras_are_named_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("peft", "matplotlib") else real(name, *a)
    )
    assert main(["finetune", *TINY, "--method", "lora", "--output", str(tmp_path / "lora")]) == 2
    assert "pip install 'gift[lora]'" in capsys.readouterr().err
    out = finetune_run(tmp_path, "nocurves", "--epochs", "1")
    assert "pip install 'gift[plots]'" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "curves.png")) and os.path.isfile(os.path.join(out, "metrics.csv"))
