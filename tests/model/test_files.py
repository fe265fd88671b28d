"""gift.files: atomic writes, the README's marked blocks, state dicts read from files."""
import os

import pytest
import torch

from gift.files import atomic_write, read_state_dict, replace_marked_block


def test_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]




def test_marked_block_is_replaced_between_its_markers_and_a_missing_one_is_named():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb <!-- x:end -->"
    assert replace_marked_block(text, "<!-- x:start -->", "<!-- x:end -->", "\nnew\n") == \
        "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb <!-- x:end -->"
    with pytest.raises(ValueError, match="no <!-- y:start --> ... <!-- y:end --> block"):
        replace_marked_block(text, "<!-- y:start -->", "<!-- y:end -->", "")


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
