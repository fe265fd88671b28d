"""gift.files: state dicts read from files, and the file writers of `gift_kernels.files`."""
import pytest
import torch

import gift.files
import gift_kernels.files
from gift.files import read_state_dict


def test_the_file_writers_are_gift_kernels_ones():
    """One home for atomic writes and marked blocks (tests/kernels/test_files.py tests them)."""
    assert (gift.files.atomic_write, gift.files.atomic_write_json, gift.files.atomic_write_text,
            gift.files.replace_marked_block, gift.files.write_marked_block) == \
        (gift_kernels.files.atomic_write, gift_kernels.files.atomic_write_json, gift_kernels.files.atomic_write_text,
         gift_kernels.files.replace_marked_block, gift_kernels.files.write_marked_block)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module."])
def test_one_reader_unwraps_checkpoints_and_names_the_file_in_errors(tmp_path, wrapper):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(4)}
    saved = {wrapper: state} if wrapper != "module." else {"module." + k: v for k, v in state.items()}
    torch.save(saved, tmp_path / "w.pt")
    got = read_state_dict(str(tmp_path / "w.pt"), unwrap=("state_dict", "model"))
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="pretrained file .* does not exist"):
        read_state_dict(str(tmp_path / "none.pt"), what="pretrained file")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read pretrained file"):
        read_state_dict(str(tmp_path / "bad.pt"), what="pretrained file")
