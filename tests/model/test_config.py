import pytest

from gift import GIFTConfig


def test_defaults_follow_the_spec():
    c = GIFTConfig()
    assert (c.rank, c.block, c.num_blocks, c.num_clusters, c.num_heads) == (16, "paca", 1, 64, 1)
    assert (c.mlp_ratio, c.cluster_activation, c.target_modules) == (2.0, "sigmoid", ("attn.proj",))
    assert (c.in_projection_bias, c.out_projection_bias, c.dtype) == (False, False, "float32")


def test_dict_round_trip():
    c = GIFTConfig(rank=24, num_heads=3, block="paca_attn", target_modules=("attn.proj", "mlp.fc2"))
    assert GIFTConfig.from_dict(c.to_dict()) == c
    assert GIFTConfig.from_dict(c.to_dict()).target_modules == ("attn.proj", "mlp.fc2")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rank=10, num_heads=3), ValueError, "rank=10 is not divisible by num_heads=3"),
        (dict(block="mixer"), ValueError, "block='mixer' is unknown"),
        (dict(cluster_activation="relu"), ValueError, "cluster_activation='relu' is unknown"),
        (dict(rank=0), ValueError, "rank must be a positive integer"),
        (dict(num_clusters=-1), ValueError, "num_clusters must be a positive integer"),
        (dict(num_heads=0), ValueError, "num_heads must be a positive integer"),
        (dict(num_blocks=0), ValueError, "num_blocks must be a positive integer"),
        (dict(mlp_ratio=0.0), ValueError, "mlp_ratio must be positive"),
        (dict(rank=1.5), TypeError, "rank must be an int"),
        (dict(dtype="float8"), ValueError, "dtype='float8' is unknown"),
        (dict(target_modules=()), ValueError, "target_modules must be non-empty"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        GIFTConfig(**kwargs)


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['ranks'\]"):
        GIFTConfig.from_dict({"ranks": 4})
