"""Local copies of the paper's benchmarks as datasets: ``imagefolder:DIR``, ``fgvc-json:DIR``, ``vtab1k:DIR/TASK``.

Every format yields ``(image float (3, S, S) normalised, label int)`` exactly as the ImageFolder data of
``gift finetune`` does (resized to ``image_size`` x ``image_size``, bilinear, no augmentation: the paper's
FGVC and VTAB-1k protocol), and knows its class count and class names. Labels are the same for every
split of one dataset. Nothing is downloaded.

- ``imagefolder:DIR``: ``DIR/train/<class>/<image>``, ``DIR/val/...`` (``DIR/test/...`` optional).
- ``fgvc-json:DIR``: ``DIR/{train,val,test}.json``, each ``{"relative/path.jpg": "132", ...}``; paths are
  relative to ``DIR/images/`` (or ``DIR/Images/``) or to ``DIR/`` (detected, and said by ``describe()``);
  class ids (ints or integer strings such as ``"007"``) of ``train.json`` map to 0..C-1 in numeric order.
- ``vtab1k:DIR/TASK``: ``TASK/{train800,val200,train800val200,test}.txt``, lines ``relative/path.jpg LABEL``
  relative to ``TASK/`` (or ``TASK/images/``); labels are 0..C-1 (C known for the 19 VTAB-1k tasks).

Split names: ``train|train800|train800val200|trainval`` for training, ``val|val200|test`` for evaluation;
``train``/``val``/``trainval`` mean ``train800``/``val200``/``train800val200`` for VTAB-1k.
Bad input (missing file, unreadable image, label out of range, empty split) raises `DataError` with one
line naming the file and line.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .data import ImageFolderDataset, ScanResult, scan_image_folder
from .errors import DataError

FORMATS = ("imagefolder", "fgvc-json", "vtab1k")
TRAIN_SPLITS = ("train", "train800", "train800val200", "trainval")
EVAL_SPLITS = ("val", "val200", "test")

# The 19 VTAB-1k tasks under the folder names of the NOAH/FacT/SPT release: group and class count.
VTAB1K_TASKS = {
    "cifar": ("Natural", 100), "caltech101": ("Natural", 102), "dtd": ("Natural", 47),
    "oxford_flowers102": ("Natural", 102), "oxford_iiit_pet": ("Natural", 37), "svhn": ("Natural", 10),
    "sun397": ("Natural", 397),
    "patch_camelyon": ("Specialized", 2), "eurosat": ("Specialized", 10), "resisc45": ("Specialized", 45),
    "diabetic_retinopathy": ("Specialized", 5),
    "clevr_count": ("Structured", 8), "clevr_dist": ("Structured", 6), "dmlab": ("Structured", 6),
    "kitti": ("Structured", 4), "dsprites_loc": ("Structured", 16), "dsprites_ori": ("Structured", 16),
    "smallnorb_azi": ("Structured", 18), "smallnorb_ele": ("Structured", 9),
}
VTAB1K_GROUPS = ("Natural", "Specialized", "Structured")


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``format`` is one of `FORMATS` or ``"embedded"``; ``path`` the local copy."""

    format: str
    path: str

    @property
    def name(self) -> str:
        """The dataset's short name (a column of the results table): the folder or VTAB task name."""
        return os.path.basename(os.path.normpath(self.path)) if self.path else "embedded"

    def __str__(self) -> str:
        return "default" if self.format == "embedded" else f"{self.format}:{self.path}"


def has_format(spec: str) -> bool:
    """Whether ``spec`` names its format (``fgvc-json:DIR``...) rather than being a bare folder or ``default``."""
    return spec.partition(":")[0] in FORMATS


def parse_data_spec(spec: str) -> DataSpec:
    """``imagefolder:DIR`` / ``fgvc-json:DIR`` / ``vtab1k:DIR/TASK`` / ``default``; a bare ``DIR`` is an ImageFolder."""
    if spec in (None, "", "default", "embedded"):
        return DataSpec("embedded", "")
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        if not rest:
            raise DataError(f"--data {spec!r} names no folder; write {head}:PATH")
        return DataSpec(head, rest)
    if sep and not os.path.exists(spec) and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", head):
        raise DataError(f"--data {spec!r}: unknown format {head!r}; use one of "
                        f"{', '.join(f + ':PATH' for f in FORMATS)} or default")
    return DataSpec("imagefolder", spec)


def absolute_data_spec(spec: str) -> str:
    """``spec`` with its folder made absolute (``fgvc-json:/abs/cub``), to be found again from elsewhere."""
    parsed = parse_data_spec(spec)
    if parsed.format == "embedded":
        return spec
    path = os.path.abspath(parsed.path)
    return f"{parsed.format}:{path}" if has_format(spec) else path


def split_file_name(fmt: str, split: str) -> str:
    """The canonical split of ``fmt`` behind a ``--train-split``/``--eval-split`` name (VTAB-1k aliases resolved)."""
    names = {"imagefolder": ("train", "val", "trainval", "test"), "fgvc-json": ("train", "val", "trainval", "test"),
             "vtab1k": ("train800", "val200", "train800val200", "test")}[fmt]
    if fmt == "vtab1k":
        split = {"train": "train800", "val": "val200", "trainval": "train800val200"}.get(split, split)
    if split not in names:
        raise DataError(f"{fmt} data has no split {split!r}; it has {', '.join(names)}"
                        + (" (aliases: train, val, trainval)" if fmt == "vtab1k" else ""))
    return split


class LabelledImages(ImageFolderDataset):
    """Image files with labels 0..C-1: ``(image float (3, S, S) normalised, label)`` per item.

    ``classes`` (C names), ``num_classes``, ``files`` [(path, label)], ``sources`` ["FILE:LINE" per file],
    ``image_root`` (where relative paths were found) and ``describe()`` (one line for the log).
    """

    format = ""
    reads_images = False  # True where _read already opened every image (and skipped or refused broken ones)

    def __init__(self, root: str, split: str, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 skip_bad_images: bool = False):
        self.root, self.split = root, split
        self.image_root = root
        self.skip_bad_images, self.skipped = skip_bad_images, []
        entries, classes = self._read(root, split)
        listed = len(entries) + len(self.skipped)  # _read may have skipped broken images already
        files, sources = [], []
        for path, label, where in entries:
            problem = None if self.reads_images else _unreadable(path)
            if problem and not skip_bad_images:
                raise DataError(f"{where}: cannot read image {path!r} ({problem}); fix or remove it, "
                                f"or pass --skip-bad-images")
            if problem:
                self.skipped.append(path)
                continue
            files.append((path, label))
            sources.append(where)
        if not files:
            raise DataError(f"{root} ({split}): none of the {listed} listed images can be read (empty split)")
        super().__init__(ScanResult(files, list(classes), self.skipped), image_size, mean, std)
        self.sources = sources

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _read(self, root: str, split: str) -> tuple[list[tuple[str, int, str]], list[str]]:
        """[(image path, label, "FILE:LINE")] of ``split`` and the class names; raises `DataError`."""
        raise NotImplementedError

    def describe(self) -> str:
        where = "" if self.image_root == self.root else f", images under {self.image_root}/"
        return (f"{self.format}:{self.root} {self.split}: {len(self)} images of {self.num_classes} classes{where}"
                + (f", {len(self.skipped)} unreadable skipped" if self.skipped else ""))

    def __getitem__(self, i: int):
        try:
            return super().__getitem__(i)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for files broken past their header
            raise DataError(f"{self.sources[i]}: cannot read image {self.files[i][0]!r} "
                            f"({type(e).__name__}: {e}); fix or remove it") from None


def _unreadable(path: str) -> str | None:
    """None when ``path`` opens as an image, else why not."""
    from PIL import Image

    if not os.path.isfile(path):
        return "no such file"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"
    return None


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file ({what})")


def _pick_image_root(root: str, candidates: tuple[str, ...], listed: list[tuple[str, int, str]]) -> str:
    """The first of ``root/<candidate>`` under which the first listed image that exists under any of them lies
    (so missing images, skipped with --skip-bad-images, do not hide the root). ``listed``: [(relative path, label,
    "FILE:LINE")]."""
    bases = [os.path.join(root, sub) if sub else root for sub in candidates]
    for rel, _, _ in listed:
        for base in bases:
            if os.path.isfile(os.path.join(base, rel)):
                return base
    tried = " nor ".join(base + "/" for base in bases)
    raise DataError(f"{listed[0][2]}: image {listed[0][0]!r} is neither under {tried} (nor is any other listed "
                    f"image); is the folder the dataset's root?")


class ImageFolderImages(LabelledImages):
    """``imagefolder:DIR``: ``DIR/<split>/<class>/<image>``; ``trainval`` joins train/ and val/."""

    format = "imagefolder"
    reads_images = True

    def _read(self, root, split):
        split = split_file_name(self.format, split)
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such data folder")
        parts = ("train", "val") if split == "trainval" else (split,)
        reference = self._scan(root, "train")
        entries = []
        for part in parts:
            scan = reference if part == "train" else self._scan(root, part)
            if scan.classes != reference.classes:
                raise DataError(f"{os.path.join(root, part)}: class folders {scan.classes} differ from train/'s "
                                f"{reference.classes}; every split needs the same class folders")
            entries += [(path, label, path) for path, label in scan.files]
            self.skipped += scan.skipped
        return entries, reference.classes

    def _scan(self, root: str, part: str) -> ScanResult:
        folder = os.path.join(root, part)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: no such folder (expected {root}/{part}/<class>/<images>)")
        return scan_image_folder(folder, self.skip_bad_images)


_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


class FGVCJsonImages(LabelledImages):
    """``fgvc-json:DIR``: ``DIR/{train,val,test}.json`` mapping image paths to class ids ("132", 7, "007")."""

    format = "fgvc-json"
    IMAGE_DIRS = ("images", "Images", "")

    def _read(self, root, split):
        split = split_file_name(self.format, split)
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such data folder")
        train = self._load(root, "train")
        ids = sorted({cid for _, cid, _ in train})
        index = {cid: i for i, cid in enumerate(ids)}
        entries = []
        for part in (("train", "val") if split == "trainval" else (split,)):
            listed = train if part == "train" else self._load(root, part)
            if not entries and listed:
                self.image_root = _pick_image_root(root, self.IMAGE_DIRS, listed)
            for rel, cid, where in listed:
                if cid not in index:
                    raise DataError(f"{where}: class {cid} is not among the {len(ids)} classes of train.json "
                                    f"(ids {ids[0]}..{ids[-1]}); every class needs training images")
                entries.append((os.path.join(self.image_root, rel), index[cid], where))
        return entries, self._class_names(train, ids)

    @staticmethod
    def _load(root: str, part: str) -> list[tuple[str, int, str]]:
        """[(relative image path, integer class id, "FILE:LINE")] of ``root/part.json``."""
        path = os.path.join(root, part + ".json")
        _require_file(path, f"the {part} split of an fgvc-json dataset")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(mapping, dict):
            raise DataError(f"{path}:1: expected a JSON object {{\"image path\": \"class id\", ...}}")
        lines = {}
        for m in _JSON_KEY.finditer(text):
            lines.setdefault(json.loads(f'"{m.group(1)}"'), text.count("\n", 0, m.start()) + 1)
        listed = []
        for rel, value in mapping.items():
            where = f"{path}:{lines.get(rel, 1)}"
            if isinstance(value, bool) or not (isinstance(value, int) or
                                               (isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value))):
                raise DataError(f"{where}: class id {value!r} of {rel!r} is not a non-negative integer")
            listed.append((rel, int(value), where))
        if not listed:
            raise DataError(f"{path}:1: lists no images (empty split)")
        return listed

    @staticmethod
    def _class_names(train, ids) -> list[str]:
        """A class's top folder (e.g. ``132.White_crowned_Sparrow``) where folders and ids match one to one,
        else the id as written."""
        folders = {}
        for rel, cid, _ in train:
            folders.setdefault(cid, set()).add(rel.replace("\\", "/").split("/")[0] if "/" in rel else None)
        names = [next(iter(folders[c])) if len(folders[c]) == 1 else None for c in ids]
        if None in names or len(set(names)) != len(names):
            return [str(c) for c in ids]
        return names


class VTAB1kImages(LabelledImages):
    """``vtab1k:DIR/TASK``: ``TASK/<split>.txt`` lines ``relative/path.jpg LABEL`` (paths relative to ``TASK/``)."""

    format = "vtab1k"
    IMAGE_DIRS = ("", "images")
    SPLIT_FILES = ("train800", "val200", "train800val200", "test")

    def _read(self, root, split):
        split = split_file_name(self.format, split)
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such VTAB-1k task folder (expected DIR/TASK with train800.txt, ...)")
        task = os.path.basename(os.path.normpath(root))
        listed = self._load(root, split)
        if task in VTAB1K_TASKS:
            num_classes = VTAB1K_TASKS[task][1]
        else:  # another task in the same layout: the classes are those its split files use
            num_classes = 1 + max(label for s in self.SPLIT_FILES if os.path.isfile(os.path.join(root, s + ".txt"))
                                  for _, label, _ in self._load(root, s))
        self.image_root = _pick_image_root(root, self.IMAGE_DIRS, listed)
        entries = []
        for rel, label, where in listed:
            if not 0 <= label < num_classes:
                raise DataError(f"{where}: label {label} is outside the {num_classes} classes 0..{num_classes - 1} "
                                f"of {task}")
            entries.append((os.path.join(self.image_root, rel), label, where))
        return entries, [str(c) for c in range(num_classes)]

    @staticmethod
    def _load(root: str, split: str) -> list[tuple[str, int, str]]:
        path = os.path.join(root, split + ".txt")
        _require_file(path, f"the {split} split of a VTAB-1k task")
        listed = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                    raise DataError(f"{path}:{number}: expected 'relative/path.jpg LABEL', got {line.strip()!r}")
                listed.append((parts[0].strip(), int(parts[1]), f"{path}:{number}"))
        if not listed:
            raise DataError(f"{path}:1: lists no images (empty split)")
        return listed


DATASET_CLASSES = {"imagefolder": ImageFolderImages, "fgvc-json": FGVCJsonImages, "vtab1k": VTAB1kImages}


def open_local_split(spec: str | DataSpec, split: str, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               skip_bad_images: bool = False) -> LabelledImages:
    """The ``split`` of the local dataset ``spec`` (not ``default``: the embedded data has its own class)."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if spec.format not in DATASET_CLASSES:
        raise DataError(f"--data {spec}: the embedded dataset has no named splits; give a local copy "
                        f"({', '.join(f + ':PATH' for f in FORMATS)})")
    return DATASET_CLASSES[spec.format](spec.path, split, image_size, mean, std, skip_bad_images)
