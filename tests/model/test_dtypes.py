"""gift.dtypes: the one table of dtype names, their short aliases, and the autocast helper."""
import pytest
import torch

from gift.dtypes import autocast_for, backbone_cast_dtype, dtype_name, expand_alias, short_name, torch_dtype


def test_names_and_aliases_read_as_torchs_names():
    assert [dtype_name(t) for t in ("bf16", "bfloat16", "fp16", "fp32")] == ["bfloat16", "bfloat16", "float16",
                                                                           "float32"]
    assert torch_dtype("bf16") is torch.bfloat16 and short_name(torch.bfloat16) == "bf16"
    assert (expand_alias("fp16"), expand_alias("nf4"), expand_alias("bf17")) == ("float16", "nf4", "bf17")
    with pytest.raises(ValueError, match="unknown dtype 'bf17'; choose one of float32"):
        dtype_name("bf17")


def test_backbone_storage_names_give_the_dtype_the_frozen_weights_are_cast_to():
    assert [backbone_cast_dtype(n) for n in ("float32", "bfloat16", "bf16", "float16", "nf4")] == \
        [None, torch.bfloat16, torch.bfloat16, torch.float16, torch.bfloat16]


def test_autocast_for_runs_16_bit_dtypes_and_switches_others_off():
    x = torch.ones(2, 2)
    with autocast_for("cpu", "bf16"):
        assert (x @ x).dtype is torch.bfloat16
        with autocast_for("cpu", None):
            assert (x @ x).dtype is torch.float32
    with autocast_for("cpu", torch.float32):
        assert (x @ x).dtype is torch.float32
