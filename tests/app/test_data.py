"""gift.app.data: imagefolder, fgvc-json and vtab1k trees written here; counts, labels, splits, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gift.app.cli import main
from gift.app.data import (
    DataSpec,
    EmbeddedSpec,
    FGVCJsonImages,
    ImageFolderDataset,
    ScanResult,
    VTAB1kImages,
    open_local_split,
    open_split,
    open_train_val,
    parse_data_spec,
    split_file_name,
)
from gift.app.data.images import read_rgb
from gift.app.errors import DataError
from tests.helpers import broken_image, fgvc_tree, vtab_tree, write_image

SIZE = 8


def json_line(mapping, key) -> int:
    """The 1-based line of ``key`` in ``json.dump(mapping, indent=2)``."""
    lines = json.dumps(mapping, indent=2).splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(f'  "{key}":'))


def pixel_labels(ds):
    """(first pixel value before normalisation, label) of every item: which image carries which label."""
    return sorted((round(float(x[0, 0, 0]) * 127.5 + 127.5), y) for x, y in ds)


def test_parse_data_spec():
    assert parse_data_spec("fgvc-json:/d/cub") == DataSpec("fgvc-json", "/d/cub")
    assert parse_data_spec("vtab1k:/d/vtab-1k/dtd").name == "dtd"
    assert parse_data_spec("imagefolder:/d/x/").name == "x"
    assert parse_data_spec("/some/folder") == DataSpec("imagefolder", "/some/folder")
    assert parse_data_spec("default").format == "embedded"
    with pytest.raises(DataError, match="unknown format 'coco'"):
        parse_data_spec("coco:/d")
    with pytest.raises(DataError, match="names no folder"):
        parse_data_spec("vtab1k:")


def test_split_names_and_vtab_aliases():
    assert (
        split_file_name("vtab1k", "train") == "train800" and split_file_name("vtab1k", "trainval") == "train800val200"
    )
    assert split_file_name("vtab1k", "val") == "val200" and split_file_name("fgvc-json", "test") == "test"
    with pytest.raises(DataError, match="fgvc-json data has no split 'train800'"):
        split_file_name("fgvc-json", "train800")


def test_imagefolder_splits_labels_and_items_match_gift_finetune(tmp_path):
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                write_image(str(tmp_path / split / name / f"{i}.png"), 40 * c + i)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    train = open_local_split(f"imagefolder:{tmp_path}", "train", SIZE, mean, std)
    assert (train.classes, train.num_classes, len(train)) == (["cat", "dog"], 2, 4)
    assert (
        len(open_local_split(str(tmp_path), "trainval", SIZE)) == 6
        and len(open_local_split(str(tmp_path), "test", SIZE)) == 2
    )
    plain = ImageFolderDataset(ScanResult(train.files, train.classes, []), SIZE, mean, std)
    x, y = train[3]
    assert x.shape == (3, SIZE, SIZE) and torch.equal(x, plain[3][0]) and y == plain[3][1] == 1
    with pytest.raises(DataError, match="no split 'val200'"):
        open_local_split(str(tmp_path), "val200", SIZE)
    os.makedirs(tmp_path / "val" / "bird")
    write_image(str(tmp_path / "val" / "bird" / "0.png"), 1)
    with pytest.raises(DataError, match=r"val: class folders \['bird', 'cat', 'dog'\] differ"):
        open_local_split(str(tmp_path), "trainval", SIZE)


@pytest.mark.parametrize("spec", ["{root}", "imagefolder:{root}"])
def test_an_imagefolder_split_opens_alone_with_its_own_classes(tmp_path, spec):
    """A folder with val/ only (for `gift eval`, which checks the classes against the adapter's) opens;
    finetune compares its two splits itself."""
    for c, name in enumerate(("cat", "dog")):
        write_image(str(tmp_path / "val" / name / "0.png"), 40 * c)
    data = spec.format(root=tmp_path)
    ds, classes, skipped = open_split(data, "val", SIZE, (0.5,) * 3, (0.5,) * 3, EmbeddedSpec())
    assert (len(ds), classes, skipped) == (2, ["cat", "dog"], 0)
    with pytest.raises(DataError, match="train: no such folder"):
        open_split(data, "trainval", SIZE, (0.5,) * 3, (0.5,) * 3, EmbeddedSpec())
    write_image(str(tmp_path / "train" / "cat" / "0.png"), 1)
    with pytest.raises(DataError, match=r"have different class folders: \['cat'\] vs \['cat', 'dog'\]"):
        open_train_val(data, SIZE, (0.5,) * 3, (0.5,) * 3, EmbeddedSpec())


def test_imagefolder_bad_image_named_or_skipped(tmp_path):
    write_image(str(tmp_path / "train" / "a" / "0.png"), 1)
    broken_image(str(tmp_path / "train" / "a" / "1.png"))
    with pytest.raises(DataError, match="1.png"):
        open_local_split(str(tmp_path), "train", SIZE)
    ds = open_local_split(str(tmp_path), "train", SIZE, skip_bad_images=True)
    assert len(ds) == 1 and ds.skipped == [str(tmp_path / "train" / "a" / "1.png")]
    broken_image(str(tmp_path / "train" / "a" / "0.png"))
    with pytest.raises(DataError, match=r"none of the 2 listed images can be read \(empty split\)"):
        open_local_split(str(tmp_path), "train", SIZE, skip_bad_images=True)
    with pytest.raises(DataError, match="test: no such folder"):
        open_local_split(str(tmp_path), "test", SIZE, skip_bad_images=True)


@pytest.mark.parametrize("image_dir", ["images", ""])
def test_fgvc_json_numeric_label_order_same_for_every_split(tmp_path, image_dir):
    listed = fgvc_tree(str(tmp_path), image_dir)
    spec = f"fgvc-json:{tmp_path}"
    train, val, test = (open_local_split(spec, s, SIZE) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test), len(open_local_split(spec, "trainval", SIZE))) == (9, 3, 6, 12)
    assert train.classes == val.classes == test.classes == ["003.Crow", "007.Sparrow", "012.Wren"]
    expected = {3: 0, 7: 1, 12: 2}  # numeric, not string order ("007" < "12" < "3")
    for ds, split in ((train, "train"), (test, "test")):
        by_path = {os.path.relpath(p, ds.image_root).replace(os.sep, "/"): y for p, y in ds.files}
        assert by_path == {rel: expected[int(cid)] for rel, cid in listed[split].items()}
    assert pixel_labels(val) == [(30, 0), (70, 1), (120, 2)]
    want_root = os.path.join(str(tmp_path), "images") if image_dir else str(tmp_path)
    assert train.image_root == want_root
    assert ("images under" in train.describe()) == bool(image_dir) and "9 images of 3 classes" in train.describe()


def test_fgvc_json_class_names_fall_back_to_ids(tmp_path):
    for rel, cid in (("jpg/a.png", 1), ("jpg/b.png", 2)):
        write_image(str(tmp_path / rel), 5)
    (tmp_path / "train.json").write_text(json.dumps({"jpg/a.png": 1, "jpg/b.png": 2}))
    assert FGVCJsonImages(str(tmp_path), "train", SIZE).classes == ["1", "2"]


def test_fgvc_json_bad_input_names_file_and_line(tmp_path):
    fgvc_tree(str(tmp_path))
    root = str(tmp_path)
    os.remove(os.path.join(root, "test.json"))
    with pytest.raises(DataError, match=r"test\.json: no such file"):
        open_local_split(f"fgvc-json:{root}", "test", SIZE)
    val = json.load(open(os.path.join(root, "val.json")))
    key = sorted(val)[1]
    line = json_line(val, key)
    with open(os.path.join(root, "val.json"), "w") as f:
        json.dump({**val, key: "99"}, f, indent=2)
    with pytest.raises(DataError, match=rf"val\.json:{line}: class 99 is not among the 3 classes"):
        open_local_split(f"fgvc-json:{root}", "val", SIZE)
    with open(os.path.join(root, "val.json"), "w") as f:
        json.dump({**val, key: "sparrow"}, f, indent=2)
    with pytest.raises(DataError, match=rf"val\.json:{line}: class id 'sparrow'.*not a non-negative integer"):
        open_local_split(f"fgvc-json:{root}", "val", SIZE)
    with open(os.path.join(root, "val.json"), "w") as f:
        f.write("{}")
    with pytest.raises(DataError, match=r"val\.json:1: lists no images \(empty split\)"):
        open_local_split(f"fgvc-json:{root}", "val", SIZE)
    with open(os.path.join(root, "val.json"), "w") as f:
        f.write('{\n"a.jpg": 1,\n')
    with pytest.raises(DataError, match=r"val\.json:3: not valid JSON"):
        open_local_split(f"fgvc-json:{root}", "val", SIZE)
    train = json.load(open(os.path.join(root, "train.json")))
    broken = sorted(train)[2]
    broken_image(os.path.join(root, "images", broken))
    line = json_line(train, broken)
    with pytest.raises(DataError, match=rf"train\.json:{line}: cannot read image .*{broken}"):
        open_local_split(f"fgvc-json:{root}", "train", SIZE)
    assert len(open_local_split(f"fgvc-json:{root}", "train", SIZE, skip_bad_images=True)) == 8
    for rel in train:
        broken_image(os.path.join(root, "images", rel))
    with pytest.raises(DataError, match=r"none of the 9 listed images can be read \(empty split\)"):
        open_local_split(f"fgvc-json:{root}", "train", SIZE, skip_bad_images=True)
    fgvc_tree(root)
    missing = list(train)[-1]
    os.remove(os.path.join(root, "images", missing))
    with pytest.raises(
        DataError, match=rf"train\.json:{json_line(train, missing)}: cannot read image .* \(no such file\)"
    ):
        open_local_split(f"fgvc-json:{root}", "train", SIZE)
    os.remove(os.path.join(root, "images", next(iter(train))))
    with pytest.raises(DataError, match=r"train\.json:2: cannot read image .* \(no such file\)"):
        open_local_split(f"fgvc-json:{root}", "train", SIZE)  # the root comes from the images that exist
    os.rename(os.path.join(root, "images"), os.path.join(root, "pictures"))
    with pytest.raises(DataError, match=r"train\.json:\d+: image .* is neither under .*images/ nor"):
        open_local_split(f"fgvc-json:{root}", "train", SIZE)


@pytest.mark.parametrize("image_dir", ["", "images"])
def test_vtab1k_splits_aliases_and_labels(tmp_path, image_dir):
    folder = vtab_tree(str(tmp_path), "dtd", image_dir=image_dir)
    spec = f"vtab1k:{folder}"
    train = open_local_split(spec, "train800", SIZE)
    assert train.num_classes == 47 and train.classes[:3] == ["0", "1", "2"] and len(train) == 6
    assert len(open_local_split(spec, "train", SIZE)) == 6 and len(open_local_split(spec, "val", SIZE)) == 3
    assert len(open_local_split(spec, "train800val200", SIZE)) == 9 and len(open_local_split(spec, "test", SIZE)) == 6
    assert pixel_labels(open_local_split(spec, "val200", SIZE)) == [(0, 0), (10, 1), (20, 2)]
    assert train.image_root == (os.path.join(folder, "images") if image_dir else folder)


def test_vtab1k_unknown_task_counts_its_labels(tmp_path):
    folder = vtab_tree(str(tmp_path), "my_task", labels=(0, 4))
    assert VTAB1kImages(folder, "test", SIZE).num_classes == 5


def test_vtab1k_bad_input_names_file_and_line(tmp_path):
    folder = vtab_tree(str(tmp_path), "kitti")
    test_txt = os.path.join(folder, "test.txt")
    lines = open(test_txt).read().splitlines()
    lines[3] = lines[3].rsplit(None, 1)[0] + " 4"  # kitti has 4 classes: 0..3
    open(test_txt, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test\.txt:4: label 4 is outside the 4 classes 0\.\.3 of kitti"):
        open_local_split(f"vtab1k:{folder}", "test", SIZE)
    lines[3] = "no-label-here.png"
    open(test_txt, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test\.txt:4: expected 'relative/path.jpg LABEL'"):
        open_local_split(f"vtab1k:{folder}", "test", SIZE)
    open(os.path.join(folder, "val200.txt"), "w").write("\n")
    with pytest.raises(DataError, match=r"val200\.txt:1: lists no images \(empty split\)"):
        open_local_split(f"vtab1k:{folder}", "val", SIZE)
    os.remove(os.path.join(folder, "train800val200.txt"))
    with pytest.raises(DataError, match=r"train800val200\.txt: no such file"):
        open_local_split(f"vtab1k:{folder}", "trainval", SIZE)
    second = open(os.path.join(folder, "train800.txt")).read().splitlines()[1].rsplit(None, 1)[0]
    broken_image(os.path.join(folder, second))
    with pytest.raises(DataError, match=rf"train800\.txt:2: cannot read image .*{second}"):
        open_local_split(f"vtab1k:{folder}", "train", SIZE)
    with pytest.raises(DataError, match="no such VTAB-1k task folder"):
        open_local_split(f"vtab1k:{tmp_path}/nothing", "train", SIZE)


def test_a_missing_first_image_is_named_or_skipped_and_does_not_hide_the_image_root(tmp_path):
    folder = vtab_tree(str(tmp_path / "v"), "dtd")
    first = open(os.path.join(folder, "train800.txt")).readline().split()[0]
    os.remove(os.path.join(folder, first))
    with pytest.raises(DataError, match="train800.txt:1: cannot read image .*no such file.*--skip-bad-images"):
        open_local_split(f"vtab1k:{folder}", "train800", SIZE)
    ds = open_local_split(f"vtab1k:{folder}", "train800", SIZE, skip_bad_images=True)
    assert len(ds) == 5 and ds.skipped == [os.path.join(folder, first)]
    splits = fgvc_tree(str(tmp_path / "f"))
    rel = next(iter(splits["train"]))
    os.remove(tmp_path / "f" / "images" / rel)
    ds = open_local_split(f"fgvc-json:{tmp_path / 'f'}", "train", SIZE, skip_bad_images=True)
    assert len(ds) == 8 and ds.image_root == str(tmp_path / "f" / "images")


def test_image_broken_after_its_header_is_named_at_load_time(tmp_path):
    folder = vtab_tree(str(tmp_path), "dtd", labels=(0,))
    ds = open_local_split(f"vtab1k:{folder}", "test", SIZE)
    path = ds.files[1][0]
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 9).save(path, format="PNG")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])  # header intact, pixels cut off
    with pytest.raises(DataError, match=r"test\.txt:2: cannot read image"):
        ds[1]


def write_tree(root, classes=("a", "b"), per_class=2, size=16):
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size, 3), 40 * i + 100 * (c == "b"), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")


def test_hidden_folders_and_files_are_not_classes(tmp_path):
    write_tree(tmp_path / "tree")
    for split in ("train", "val"):
        os.makedirs(tmp_path / "tree" / split / ".ipynb_checkpoints")
        (tmp_path / "tree" / split / ".DS_Store").write_bytes(b"\0\0")
        (tmp_path / "tree" / split / "a" / "._0.png").write_bytes(b"AppleDouble")
    out = str(tmp_path / "o")
    assert main(["finetune", "--data", str(tmp_path / "tree"), "--batch-size", "2", "--epochs", "1", "--quiet",
                 "--output", out]) == 0
    meta = json.load(open(os.path.join(out, "adapter", "gift_config.json")))
    assert meta["run"]["classes"] == ["a", "b"]


# ---------------------------------------------------------------------------------------- image modes
def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_images_of_every_mode_become_the_rgb_their_values_mean(tmp_path):
    grey = np.array([[0, 1000], [40000, 65535]])
    cases = {  # file: (image, expected red channel; every channel is equal unless said)
        "sixteen.png": (Image.fromarray(grey.astype(np.uint16)), [[0, 4], [156, 255]]),  # v / 257
        "thirtytwo.tiff": (Image.fromarray(grey.astype(np.int32)), [[0, 4], [156, 255]]),  # mode I, 16-bit range
        "float.tiff": (Image.fromarray(np.array([[0, 0.25], [0.5, 1.0]], np.float32)), [[0, 64], [128, 255]]),
        "la.png": (Image.fromarray(np.dstack([np.full((2, 2), 77, np.uint8), np.zeros((2, 2), np.uint8)]), "LA"),
                   [[77, 77], [77, 77]]),  # alpha dropped, not composited
        "bits.png": (Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1"), [[0, 255], [255, 0]]),
        "cmyk.jpg": (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), [[255, 255], [255, 255]]),  # no ink: white
    }
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    for name, (image, red) in cases.items():
        image.save(tmp_path / name)
        rgb = read_rgb(str(tmp_path / name), (2, 2))
        assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3), name
        assert rgb[..., 0].tolist() == red and (rgb[..., 1] == rgb[..., 0]).all(), (name, rgb[..., 0].tolist())
    palette.save(tmp_path / "palette.png")
    assert read_rgb(str(tmp_path / "palette.png"), (2, 2)).tolist() == [[[10, 20, 30], [200, 100, 50]],
                                                                        [[10, 20, 30], [10, 20, 30]]]


def test_images_whose_values_cannot_be_read_as_such_are_refused_in_one_line_before_training(tmp_path):
    write_image(str(tmp_path / "train" / "a" / "0.png"), 1)
    _save(str(tmp_path / "train" / "a" / "hdr.tiff"), np.array([[0, 2.5], [0.5, 1.0]], np.float32))
    with pytest.raises(DataError, match=r"hdr\.tiff.*values in \[0, 2\.5\]: gift reads such images as 0\.\.1"):
        open_local_split(str(tmp_path), "train", SIZE)
    os.remove(tmp_path / "train" / "a" / "hdr.tiff")
    _save(str(tmp_path / "train" / "a" / "wide.tiff"), np.array([[0, 70000], [5, 1]], np.int32))
    with pytest.raises(DataError, match=r"wide\.tiff.*values in \[0, 70000\]: gift reads such images as 16-bit"):
        open_local_split(str(tmp_path), "train", SIZE)
    assert len(open_local_split(str(tmp_path), "train", SIZE, skip_bad_images=True)) == 1
    os.remove(tmp_path / "train" / "a" / "wide.tiff")
    # 8-bit values in a 32-bit integer image, 12-bit values in a 16-bit PNG: read as 0..65535 they were black
    for name, values in (("eight.tiff", np.array([[0, 200], [255, 9]], np.int32)),
                         ("twelve.png", np.array([[0, 4095], [2000, 9]], np.uint16))):
        _save(str(tmp_path / "train" / "a" / name), values)
        hi = int(values.max())
        with pytest.raises(DataError, match=rf"{name}.*values in \[0, {hi}\]: .*would be almost black"):
            open_local_split(str(tmp_path), "train", SIZE)
        os.remove(tmp_path / "train" / "a" / name)


def test_a_png_whose_compressed_data_is_damaged_under_valid_checksums_is_refused_before_training(tmp_path):
    import struct
    import zlib

    write_image(str(tmp_path / "train" / "a" / "0.png"), 1)
    path = tmp_path / "train" / "a" / "idat.png"
    _save(str(path), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    raw = path.read_bytes()
    at = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[at - 4:at])[0]
    data = bytearray(raw[at + 4:at + 4 + length])
    data[length // 2] ^= 0xFF  # damaged before its CRC was computed: verify() passes it
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)) & 0xFFFFFFFF)
    path.write_bytes(raw[:at + 4] + bytes(data) + crc + raw[at + 8 + length:])
    with Image.open(path) as im:
        im.verify()
    with pytest.raises(DataError, match=r"cannot read image .*idat\.png"):
        open_local_split(str(tmp_path), "train", SIZE)
    assert len(open_local_split(str(tmp_path), "train", SIZE, skip_bad_images=True)) == 1


def _truncated_jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])  # its header intact: Image.verify() passes it


def test_a_truncated_jpeg_is_refused_when_the_split_opens_or_skipped_on_request(tmp_path):
    for i in range(2):
        write_image(str(tmp_path / "train" / "a" / f"{i}.jpg"), 10 * i, "JPEG")
    _truncated_jpeg(str(tmp_path / "train" / "a" / "trunc.jpg"))
    with pytest.raises(DataError, match=r"cannot read image .*trunc\.jpg.*truncated.*--skip-bad-images"):
        open_local_split(str(tmp_path), "train", SIZE)
    ds = open_local_split(str(tmp_path), "train", SIZE, skip_bad_images=True)
    assert len(ds) == 2 and ds.skipped == [str(tmp_path / "train" / "a" / "trunc.jpg")]
    splits = fgvc_tree(str(tmp_path / "f"))  # the benchmark formats decode their images as well
    broken = sorted(splits["val"])[0]
    _truncated_jpeg(str(tmp_path / "f" / "images" / broken))
    with pytest.raises(DataError, match=r"val\.json:\d+: cannot read image .*truncated"):
        open_local_split(f"fgvc-json:{tmp_path / 'f'}", "val", SIZE)


def test_split_files_cannot_name_images_outside_the_dataset_folder(tmp_path):
    root = tmp_path / "cub"
    splits = fgvc_tree(str(root))
    write_image(str(tmp_path / "outside" / "secret.png"), 3)
    for bad in ("../../outside/secret.png", str(tmp_path / "outside" / "secret.png")):
        train = {**splits["train"], bad: "007"}
        (root / "train.json").write_text(json.dumps(train, indent=2))
        with pytest.raises(DataError, match=rf"train\.json:{json_line(train, bad)}: image path .* is outside the "
                                            r"dataset folder"):
            open_local_split(f"fgvc-json:{root}", "train", SIZE)
    folder = vtab_tree(str(tmp_path / "v"), "dtd")
    with open(os.path.join(folder, "test.txt"), "a") as f:
        f.write("../../outside/secret.png 1\n")
    with pytest.raises(DataError, match=r"test\.txt:\d+: image path '\.\./\.\./outside/secret\.png' is outside"):
        open_local_split(f"vtab1k:{folder}", "test", SIZE)
