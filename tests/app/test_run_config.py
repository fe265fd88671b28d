"""gift.app.run_config: `FinetuneConfig` (every setting of a run, its flag and range) and what it trains."""
import pytest

from gift.app.cli import build_parser
from gift.app.commands.plan import PlanOptions
from gift.app.options import from_namespace
from gift.app.run_config import FinetuneConfig, training_setup
from gift.predict import TrainingSetup


def test_short_dtype_names_are_read_as_torchs_however_the_config_is_made():
    cfg = FinetuneConfig(amp="bf16", backbone_dtype="fp16", device="cpu")
    cfg.validate()
    assert (cfg.amp, cfg.backbone_dtype) == ("bfloat16", "float16")
    assert training_setup(FinetuneConfig(backbone_dtype="bf16")).backbone_dtype == "bfloat16"
    assert TrainingSetup("gift_vit_micro_patch4_32", 2, backbone_dtype="bf16", amp="fp16").backbone_dtype == "bfloat16"


@pytest.mark.parametrize("command, options", [("finetune", FinetuneConfig), ("plan", PlanOptions)])
@pytest.mark.parametrize("typed, read", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"),
                                         ("nf4", "nf4")])
def test_backbone_dtype_flag_takes_the_short_names(command, options, typed, read):
    argv = [command, "--backbone-dtype", typed]
    assert from_namespace(options, build_parser(argv).parse_args(argv)).backbone_dtype == read


def test_an_unknown_backbone_dtype_is_refused_naming_the_choices(capsys):
    argv = ["finetune", "--backbone-dtype", "bf17"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    assert "invalid choice: 'bf17'" in capsys.readouterr().err
