"""gift.files: state dicts read from files, and the file writers of `gift_kernels.files`."""
import os

import pytest
import torch

import gift.files
import gift_kernels.files
from gift.files import atomic_write, content_sha256, read_state_dict


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


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a file descriptor's file through /proc")
def test_atomic_write_puts_the_data_on_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(dst))) or real_replace(src, dst))
    path = tmp_path / "f.txt"
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"] and path.read_text() == "new"
    assert os.path.basename(events[0][1]).startswith(".tmp-") and events[2][1] == str(tmp_path)


def test_content_checksum_survives_a_save_and_load_and_sees_one_flipped_bit(tmp_path):
    state = {"w": torch.randn(3, 5), "b16": torch.ones(2, dtype=torch.bfloat16), "step": 7, "rng": (1, [2.5, None]),
             "nested": {"z": torch.zeros(0), 3: "x"}}
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    assert content_sha256(loaded) == content_sha256(state)
    loaded["w"].view(torch.int32)[1, 2] ^= 1  # the lowest bit of one float
    assert content_sha256(loaded) != content_sha256(state)
