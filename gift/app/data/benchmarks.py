"""Local copies of the paper's benchmarks as datasets: ``fgvc-json:DIR``, ``vtab1k:DIR/TASK`` (the third
format, ``imagefolder:DIR``, is `gift.app.data.images.ImageFolderImages`).

Every format yields ``(image float (3, S, S) normalised, label int)`` as `LabelledImages` does, and knows
its class count and class names. Labels are the same for every split of one dataset. Nothing is downloaded.

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

from ..errors import DataError
from .images import LabelledImages
from .spec import split_file_name

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


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file ({what})")


def _check_relative(listed: list[tuple[str, int, str]], root: str) -> None:
    """`DataError` for a listed image path that is absolute or leaves the dataset folder (``..``): split files
    name images inside ``root`` only."""
    for rel, _, where in listed:
        normal = os.path.normpath(rel.replace("\\", "/"))
        if os.path.isabs(rel) or os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
            raise DataError(f"{where}: image path {rel!r} is outside the dataset folder {root}: paths in a split "
                            f"file must be relative to it, without '..'")


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
            _check_relative(listed, root)
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
        _check_relative(listed, root)
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


