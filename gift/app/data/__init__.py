"""Data for `gift finetune`, `gift sweep` and `gift eval`, behind one ``--data`` dispatcher
(`open_split`, `open_train_val`): the embedded dataset (`synthetic`), an ImageFolder tree (``DIR`` or
``imagefolder:DIR``, `images`), or a local copy of a benchmark (``fgvc-json:DIR``,
``vtab1k:DIR/TASK``, `benchmarks`); the ``--data`` vocabulary is `spec`. Bad input raises
`gift.app.errors.DataError` naming the problem.
"""
from __future__ import annotations

import hashlib
import os

from torch.utils.data import Dataset

from ..errors import DataError
from .benchmarks import VTAB1K_GROUPS, VTAB1K_TASKS, FGVCJsonImages, VTAB1kImages
from .images import ImageFolderDataset, ImageFolderImages, LabelledImages, ScanResult, load_images, scan_image_folder
from .spec import (
    EMBEDDED,
    EVAL_SPLITS,
    FORMATS,
    SPLITS,
    TRAIN_SPLITS,
    DataSpec,
    absolute_data_spec,
    has_format,
    parse_data_spec,
    split_file_name,
)
from .synthetic import TASKS, EmbeddedSpec, SyntheticShapes, make_shapes

__all__ = [
    "EMBEDDED",
    "EVAL_SPLITS",
    "FORMATS",
    "SPLITS",
    "TASKS",
    "TRAIN_SPLITS",
    "VTAB1K_GROUPS",
    "VTAB1K_TASKS",
    "DATASET_CLASSES",
    "DataSpec",
    "EmbeddedSpec",
    "FGVCJsonImages",
    "ImageFolderDataset",
    "ImageFolderImages",
    "LabelledImages",
    "ScanResult",
    "SyntheticShapes",
    "VTAB1kImages",
    "absolute_data_spec",
    "data_content_fingerprint",
    "data_fingerprint",
    "has_format",
    "load_images",
    "make_shapes",
    "open_local_split",
    "open_split",
    "open_train_val",
    "parse_data_spec",
    "scan_image_folder",
    "split_file_name",
]

DATASET_CLASSES = {"imagefolder": ImageFolderImages, "fgvc-json": FGVCJsonImages, "vtab1k": VTAB1kImages}


def open_local_split(spec: str | DataSpec, split: str, image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                     skip_bad_images: bool = False) -> LabelledImages:
    """The ``split`` of the local dataset ``spec`` (not ``default``: the embedded data has its own class)."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if spec.format not in DATASET_CLASSES:
        raise DataError(f"--data {spec}: the embedded dataset has no named splits; give a local copy "
                        f"({', '.join(f + ':PATH' for f in FORMATS)})")
    return DATASET_CLASSES[spec.format](spec.path, split, image_size, mean, std, skip_bad_images)


def _check_bare_folder(data: str, split: str) -> None:
    """A bare ``--data DIR`` (an ImageFolder root): the folder and, for a split that is a folder, its
    ``split/`` folder exist."""
    if os.path.isfile(data):
        raise DataError(f"--data {data!r} is a file, not a folder: give an ImageFolder root holding train/ and val/ "
                        f"(or --data default for the embedded dataset)")
    if not os.path.isdir(data):
        raise DataError(f"data folder {data!r} does not exist (or pass --data default for the embedded dataset)")
    if split in SPLITS and not os.path.isdir(os.path.join(data, split)):
        raise DataError(f"data folder {data!r} has no {split}/ folder (expected {data}/{split}/<class>/<image files>)")


def open_split(data: str, split: str, image_size: int, mean, std, embedded: EmbeddedSpec,
               skip_bad_images: bool = False) -> tuple[Dataset, list[str], int]:
    """One split of ``data`` (``default``, an ImageFolder root holding ``<split>/<class>/<image>``, or a
    local copy ``fgvc-json:DIR`` / ``vtab1k:DIR/TASK`` / ``imagefolder:DIR``):
    ``(dataset, class names, images skipped)``. Raises `DataError` naming the problem."""
    if data in EMBEDDED:
        if split not in SPLITS:
            raise DataError(f"the embedded dataset has no split {split!r}; it has {', '.join(SPLITS)}")
        size = embedded.train_size if split == "train" else embedded.val_size
        ds = SyntheticShapes(size, image_size, seed=embedded.data_seed + SPLITS.index(split), task=embedded.task,
                             mean=mean, std=std)
        return ds, ds.classes, 0
    if not has_format(data):
        _check_bare_folder(data, split)
    ds = open_local_split(data, split, image_size, mean, std, skip_bad_images)
    return ds, ds.classes, len(ds.skipped)


def open_train_val(data: str, image_size: int, mean, std, embedded: EmbeddedSpec, skip_bad_images: bool = False,
                   train_split: str = "train", eval_split: str = "val"):
    """``(train, val, class names, images skipped)`` of the named splits; they must have the same classes."""
    if data not in EMBEDDED and os.path.isdir(data):
        missing = [s for s in (train_split, eval_split) if s in SPLITS and not os.path.isdir(os.path.join(data, s))]
        if missing:
            raise DataError(
                f"data folder {data!r} has no {missing[0]}/ folder (expected {data}/{train_split}/<class>/... "
                f"and {data}/{eval_split}/<class>/...)"
            )
    train, classes, skipped_train = open_split(data, train_split, image_size, mean, std, embedded, skip_bad_images)
    val, val_classes, skipped_val = open_split(data, eval_split, image_size, mean, std, embedded, skip_bad_images)
    if classes != val_classes:
        raise DataError(f"{train_split}/ and {eval_split}/ of {data!r} have different class folders: "
                        f"{classes} vs {val_classes}")
    return train, val, classes, skipped_train + skipped_val


def data_fingerprint(dataset: Dataset) -> str:
    """What a training split is, as one string that resume compares: its number of images and a SHA-256
    of its content. The embedded dataset: its images and labels. Image files: each file's path under the
    dataset folder (so a moved copy is the same data), its label and its size in bytes (every file
    read again would take as long as an epoch)."""
    digest = hashlib.sha256()
    if isinstance(dataset, SyntheticShapes):
        digest.update(b"embedded;" + dataset.task.encode())
        digest.update(dataset.images.contiguous().numpy())
        digest.update(dataset.labels.contiguous().numpy())
    elif isinstance(dataset, ImageFolderDataset):
        root = getattr(dataset, "root", None)
        for path, label in dataset.files:
            name = os.path.relpath(path, root) if root else os.path.abspath(path)
            digest.update(f"{name}\t{label}\t{os.path.getsize(path)}\n".encode())
    else:
        raise TypeError(f"no fingerprint for a {type(dataset).__name__}")
    return f"{len(dataset)} images, sha256 {digest.hexdigest()[:16]}"


def data_content_fingerprint(dataset: Dataset) -> str:
    """`data_fingerprint` of what the images are: image files by a SHA-256 of each file's bytes and its
    label (in the split's order), so other images of the same names and sizes are other data; the
    embedded dataset as `data_fingerprint` (which already hashes its pixels)."""
    if not isinstance(dataset, ImageFolderDataset):
        return data_fingerprint(dataset)
    digest = hashlib.sha256()
    for path, label in dataset.files:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest() + f"\t{label}\n".encode())
    return f"{len(dataset)} images, sha256 {digest.hexdigest()[:16]}"
