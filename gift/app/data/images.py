"""Labelled image files as datasets: ``(image float (3, S, S) normalised, label int)`` per item, each
image resized to ``image_size`` x ``image_size`` (bilinear, no augmentation: the paper's FGVC and
VTAB-1k protocol). `LabelledImages` is what every local format shares; `ImageFolderImages` is the
one ImageFolder (``DIR/<split>/<class>/<image>``; hidden entries such as ``.ipynb_checkpoints`` are
neither classes nor images). Bad input raises `DataError` naming the file.

Images of every mode become 8-bit RGB (`rgb_image`): 16-bit and 32-bit integer images are scaled from
0..65535, float images from 0..1 (others are refused in one line), palette, grey, alpha and CMYK ones
converted as Pillow converts them. Every image is decoded once when a split is opened (JPEGs at 1/8
scale, which still reads all of their data), so that a truncated file stops the run, or is skipped with
``--skip-bad-images``, before training starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .spec import split_file_name

#: Pillow's modes of one channel of more than 8 bits: integers read as 0..65535, floats as 0..1
HIGH_DEPTH_INTEGER = ("I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;32", "I;32S", "I;32L", "I;32B")
HIGH_DEPTH_FLOAT = ("F", "F;32F", "F;32BF", "F;64F")
#: an integer image of more than 8 bits whose largest value is below this holds 8- or 12-bit values (or is
#: nearly black): read as 0..65535 it would be dark, so it is refused rather than guessed
FEWEST_16_BIT_MAX = 4096

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ScanResult:
    files: list[tuple[str, int]]
    classes: list[str]
    skipped: list[str]


def scan_image_folder(root: str, skip_bad_images: bool = False) -> ScanResult:
    """List ``root/<class>/<image>`` files and check that every image opens. Hidden entries
    (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.png``) are neither classes nor images.

    Raises `DataError` for a missing or empty folder, a class folder with no images, or (unless
    ``skip_bad_images``) an unreadable image, naming it.
    """

    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"data folder {root!r} has no class folders (expected {root}/<class>/<image files>)")
    files, skipped = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        images = sorted(f for f in os.listdir(folder) if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise DataError(f"class folder {folder!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        for f in images:
            path = os.path.join(folder, f)
            problem = _unreadable(path)
            if problem:
                if not skip_bad_images:
                    raise DataError(f"cannot read image {path!r} ({problem}); "
                                    f"fix or remove it, or pass --skip-bad-images")
                skipped.append(path)
                continue
            files.append((path, label))
    return ScanResult(files, classes, skipped)


def rgb_image(im):
    """The Pillow image ``im`` as an 8-bit RGB one. One channel of more than 8 bits is scaled: integers
    (16-bit PNG/TIFF, Pillow's ``I;16`` and ``I``) from 0..65535, floats (``F``) from 0..1; values outside
    those ranges, integers all below `FEWEST_16_BIT_MAX` (8- or 12-bit data in a wider mode) and modes
    Pillow cannot convert raise ``ValueError`` saying what to do."""
    from PIL import Image

    mode = im.mode
    if mode in HIGH_DEPTH_INTEGER or mode in HIGH_DEPTH_FLOAT:
        a = np.asarray(im)
        if a.ndim != 2:
            raise ValueError(f"a {mode} image of shape {a.shape}: expected one channel")
        if mode in HIGH_DEPTH_FLOAT:
            lo, hi = (float(a.min()), float(a.max())) if np.isfinite(a).all() else (float("nan"), float("nan"))
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"a floating-point image (mode {mode}) with values in [{lo:g}, {hi:g}]: gift reads "
                                 f"such images as 0..1; scale it to 0..1 or save it with 8 or 16 bits")
            grey = a.astype(np.float64) * 255.0
        else:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 65535:
                raise ValueError(f"an integer image (mode {mode}) with values in [{lo}, {hi}]: gift reads such images "
                                 f"as 16-bit (0..65535); save it with 8 or 16 bits")
            if hi < FEWEST_16_BIT_MAX:
                raise ValueError(f"an integer image (mode {mode}) with values in [{lo}, {hi}]: gift reads such images "
                                 f"as 16-bit (0..65535), where these would be almost black; if it holds 8- or 12-bit "
                                 f"values, save it with 8 bits or scale it to 0..65535")
            grey = a.astype(np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError:  # e.g. "La" (premultiplied alpha)
        try:
            return im.convert("RGBA").convert("RGB")
        except ValueError:
            raise ValueError(f"Pillow cannot convert an image of mode {mode!r} to RGB; save it as RGB") from None


def read_rgb(path: str, size: tuple[int, int]) -> np.ndarray:
    """The image file ``path`` as RGB (`rgb_image`), resized (bilinear) to ``size`` (H, W): ``(H, W, 3)``
    uint8. PIL's errors pass through."""
    from PIL import Image

    with Image.open(path) as im:
        im = rgb_image(im).resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).copy()


def normalised(image: np.ndarray, mean, std) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float, scaled to [0, 1] then normalised per channel."""
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_images(paths, size: tuple[int, int], mean, std) -> tuple[list[np.ndarray], torch.Tensor]:
    """``(raw (H, W, 3) uint8 arrays, normalised (B, 3, H, W) tensor)`` of image files, resized to ``size``
    (H, W); `DataError` naming an image that cannot be read."""
    raw = []
    for path in paths:
        try:
            raw.append(read_rgb(path, size))
        except Exception as e:  # PIL raises many types for broken files
            raise DataError(f"cannot read image {path!r} ({type(e).__name__}: {e})") from None
    return raw, torch.stack([normalised(image, mean, std) for image in raw])


class ImageFolderDataset(Dataset):
    """Image files with labels (``scan.files``: [(path, label)]), each resized to ``image_size`` and
    normalised with ``mean``/``std``: ``(image (3, S, S), label)`` per item."""

    def __init__(self, scan: ScanResult, image_size: int, mean, std):
        self.files, self.classes = scan.files, scan.classes
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        return normalised(read_rgb(path, (self.image_size, self.image_size)), self.mean, self.std), label


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
    """None when ``path`` is an image that decodes to RGB (`rgb_image`), else why not: every image is
    checked (``verify``: a PNG's checksums) and decoded, JPEGs at 1/8 scale (all of their data, a fraction
    of the work)."""
    from PIL import Image

    if not os.path.isfile(path):
        return "no such file"
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            rgb_image(im).load()
    except Exception as e:  # PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolderImages(LabelledImages):
    """``imagefolder:DIR``: ``DIR/<split>/<class>/<image>``; ``trainval`` joins train/ and val/."""

    format = "imagefolder"
    reads_images = True

    def _read(self, root, split):
        split = split_file_name(self.format, split)
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such data folder")
        parts = ("train", "val") if split == "trainval" else (split,)
        scans = [self._scan(root, part) for part in parts]
        reference = scans[0]  # the classes of the split asked for (of train/ for trainval), so val/ alone opens
        entries = []
        for part, scan in zip(parts, scans):
            if scan.classes != reference.classes:
                raise DataError(f"{os.path.join(root, part)}: class folders {scan.classes} differ from "
                                f"{parts[0]}/'s {reference.classes}; every split needs the same class folders")
            entries += [(path, label, path) for path, label in scan.files]
            self.skipped += scan.skipped
        return entries, reference.classes

    def _scan(self, root: str, part: str) -> ScanResult:
        folder = os.path.join(root, part)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: no such folder (expected {root}/{part}/<class>/<images>)")
        return scan_image_folder(folder, self.skip_bad_images)


