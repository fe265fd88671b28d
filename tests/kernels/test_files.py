"""gift_kernels.files: atomic writes and the README's marked blocks, for gift and the kernels' tools alike."""
import os

import pytest

from gift_kernels.files import atomic_write, atomic_write_text, replace_marked_block, write_marked_block


def test_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_an_atomic_text_file_gets_its_folder_and_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "new" / "f.json"), "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "f.json").read_text() == "{}" and os.listdir(tmp_path / "new") == ["f.json"]
    assert (os.stat(tmp_path / "new" / "f.json").st_mode & 0o777) == 0o640


def test_marked_block_is_replaced_between_its_markers_and_a_missing_one_is_named():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb <!-- x:end -->"
    assert replace_marked_block(text, "<!-- x:start -->", "<!-- x:end -->", "\nnew\n") == \
        "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb <!-- x:end -->"
    with pytest.raises(ValueError, match="no <!-- y:start --> ... <!-- y:end --> block"):
        replace_marked_block(text, "<!-- y:start -->", "<!-- y:end -->", "")


@pytest.mark.parametrize("body", ["| table |", "\n| table |\n", "| table |\n"])
def test_a_block_body_lands_on_the_lines_between_the_markers_with_or_without_its_newlines(tmp_path, body):
    """gift's writers pass the body with its newlines, the kernels' tools without: the file is the same."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- t:start -->\nold\nlines\n<!-- t:end -->\nrest\n")
    write_marked_block(str(readme), "<!-- t:start -->", "<!-- t:end -->", body)
    assert readme.read_text() == "# x\n<!-- t:start -->\n| table |\n<!-- t:end -->\nrest\n"
    assert replace_marked_block(readme.read_text(), "<!-- t:start -->", "<!-- t:end -->", "") == \
        "# x\n<!-- t:start -->\n<!-- t:end -->\nrest\n"
    with pytest.raises(ValueError, match="no <!-- t:end --> ... <!-- t:start --> block"):  # markers out of order
        replace_marked_block(readme.read_text(), "<!-- t:end -->", "<!-- t:start -->", body)
