"""Images read as pixel sequences of 256 grey levels: LRA Image (CIFAR-10) and Pathfinder.

:class:`PathfinderDataset` reads the Pathfinder / Path-X release layout that
:func:`spadeformer.data.pathfinder.generate_pathfinder` writes (documented there) and is
re-exported from that module. The rest of this page is about LRA Image, grayscale CIFAR-10:

Layout (the "CIFAR-10 python version" release)::

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5     training, 5 x 10,000 images
    <root>/cifar-10-batches-py/test_batch                        test, 10,000 images

(``root`` may also be the ``cifar-10-batches-py`` folder itself). Each file is a pickled dict
with ``b"data"``: uint8 (N, 3072), rows of 1024 red, 1024 green then 1024 blue values, each
plane in raster order, and ``b"labels"``: N ints in 0..9.

**Trust.** The release format is a pickle; it is read with a restricted unpickler that resolves
only the globals a numpy array needs (numpy's array reconstructors, ``ndarray``, ``dtype``,
and ``_codecs.encode`` which Python 3 protocol-2 pickles use for bytes). Anything else (e.g.
``os.system``) raises :class:`CorruptFileError` instead of running, so a tampered file cannot
execute code through the globals it names.

Grayscale is what LRA's pipeline feeds its models: TF's ``tf.image.rgb_to_grayscale`` on the
uint8 image, i.e. in float32 ``Y = 0.2989 r + 0.5870 g + 0.1140 b`` with r, g, b = value / 255,
then back to uint8 as ``trunc(Y * 255.5)`` (TF's ``convert_image_dtype``). Token id = grey
level, ``vocab_size`` 256, always 1024 tokens.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spadeformer.data.lra_common import (
    CorruptFileError,
    classification_item,
    import_pil,
    require_dir,
    require_file,
    split_indices,
)

__all__ = ["Cifar10GrayDataset", "PathfinderDataset", "load_cifar_batch", "rgb_to_gray"]

_LAYOUT = (
    "<root>/cifar-10-batches-py/{data_batch_1..data_batch_5,test_batch} "
    "(CIFAR-10 python release: pickled dicts with b'data' (N, 3072) uint8 and b'labels')"
)
_SPLITS = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    import codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol-5 pickles
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR-10 batch"
            ) from None


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (data uint8 (N, 3072), labels int64 (N,)), validated."""
    path = require_file(path, _LAYOUT)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise CorruptFileError(f"{path}: not a readable CIFAR-10 batch ({e})") from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise CorruptFileError(f"{path}: missing b'data' or b'labels'; expected {_LAYOUT}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptFileError(
            f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise CorruptFileError(
            f"{path}: b'labels' must be {data.shape[0]} ints in 0..9, got shape {labels.shape}"
        )
    return data, labels


_TF_GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


def rgb_to_gray(data: np.ndarray) -> np.ndarray:
    """CIFAR rows uint8 (N, 3072) (planes R, G, B) -> grey levels uint8 (N, 1024), as LRA's
    ``tf.image.rgb_to_grayscale`` computes them (module docstring): float32 throughout, so
    that the grey levels are TF's, which truncates and uses weights summing to 0.9999."""
    rgb = data.reshape(-1, 3, 1024).astype(np.float32) * np.float32(1.0 / 255.0)
    w = _TF_GRAY_WEIGHTS
    gray = (rgb[:, 0] * w[0] + rgb[:, 1] * w[1]) + rgb[:, 2] * w[2]
    return (gray * np.float32(255.5)).astype(np.uint8)  # truncates; white: 255.47 -> 255


class Cifar10GrayDataset(Dataset):
    """LRA Image: grayscale CIFAR-10 as pixel sequences.

    Args:
        root: folder containing ``cifar-10-batches-py`` (or that folder itself).
        split: ``"train"`` (data_batch_1..5, 50,000 images) or ``"test"`` (10,000).

    Items: ``{"input_ids": LongTensor (1024,) of grey levels 0..255 in raster order,
    "labels": LongTensor ()}`` (10 classes).
    """

    vocab_size = 256
    num_classes = 10

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        root = Path(root)
        folder = root if (root / _SPLITS[split][0]).exists() else root / "cifar-10-batches-py"
        parts = [load_cifar_batch(folder / name) for name in _SPLITS[split]]
        self.pixels = rgb_to_gray(np.concatenate([d for d, _ in parts]))
        self.labels = np.concatenate([lab for _, lab in parts])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return classification_item(self.pixels[i], self.labels[i])


_PF_LAYOUT = (
    "<root>/metadata/<batch>.npy (lines 'imgs/<batch> sample_<i>.png <i> <label> ...') and "
    "<root>/imgs/<batch>/sample_<i>.png (LRA Pathfinder release, e.g. "
    "pathfinder32/curv_contour_length_14)"
)


# ----------------------------------------------------------------------------------------------
# Pathfinder / Path-X (LRA): PNG images of the release layout, see spadeformer.data.pathfinder.


def _read_metadata(path: Path) -> list[list[str]]:
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):  # a genuine np.save'd string array
        try:
            import io

            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:
            raise CorruptFileError(f"{path}: unreadable numpy metadata ({e})") from None
        if arr.ndim != 2:
            raise CorruptFileError(f"{path}: numpy metadata must be 2-D, got shape {arr.shape}")
        return [[str(v) for v in row] for row in arr]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: metadata is neither text nor numpy ({e})") from None
    return [line.split() for line in text.splitlines() if line.strip()]


class PathfinderDataset(Dataset):
    """Pathfinder / Path-X images from the release layout, as pixel sequences.

    Args:
        root: the folder holding ``metadata/`` and ``imgs/`` (see the module docstring).
        split: ``"all"``, or ``"train"`` / ``"val"`` / ``"test"`` of a seeded random partition
            with ``fractions`` (LRA and S4 split the 200k images 80/10/10).
        fractions: train/val/test fractions.
        seed: seed of the partition.
        size: expected image side; None takes it from the first image.

    Items: ``{"input_ids": LongTensor (size*size,) of grey levels 0..255 in raster order,
    "labels": LongTensor ()}``; ``vocab_size`` 256. Images are decoded on access; a missing or
    undecodable PNG raises naming it.
    """

    vocab_size = 256
    num_classes = 2

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "all",
        fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        seed: int = 0,
        size: int | None = None,
    ):
        splits = ("all", "train", "val", "test")
        if split not in splits:
            raise ValueError(f"split must be one of {splits}, got {split!r}")
        self.root = require_dir(root, _PF_LAYOUT)
        meta_dir = require_dir(self.root / "metadata", _PF_LAYOUT)
        files = sorted(meta_dir.glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            raise FileNotFoundError(f"{meta_dir} holds no *.npy files; expected {_PF_LAYOUT}")
        paths: list[str] = []
        labels: list[int] = []
        for f in files:
            for lineno, fields in enumerate(_read_metadata(f), start=1):
                if len(fields) < 4 or fields[3] not in ("0", "1"):
                    raise CorruptFileError(
                        f"{f}:{lineno}: expected 'imgs/<batch> sample_<i>.png <i> <label 0|1> "
                        "...', "
                        f"got {' '.join(fields)!r}"
                    )
                paths.append(f"{fields[0]}/{fields[1]}")
                labels.append(int(fields[3]))
        index = np.arange(len(paths))
        if split != "all":
            parts = split_indices(len(paths), fractions, seed)
            index = parts[("train", "val", "test").index(split)]
            if len(index) == 0:
                raise ValueError(
                    f"split={split!r} gets no image: {len(paths)} images in {meta_dir} "
                    f"split by fractions={list(fractions)} leave it empty; use more images or "
                    "split='all'"
                )
        self.paths = [paths[i] for i in index]
        self.labels = np.asarray(labels, dtype=np.int64)[index]
        self.size = size if size is not None else self._read(0).shape[0]

    def _read(self, i: int) -> np.ndarray:
        Image = import_pil()
        path = self.root / self.paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; expected layout: {_PF_LAYOUT}")
        try:
            with Image.open(path) as im:
                im = im.convert("L") if im.mode != "L" else im
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise CorruptFileError(f"{path}: cannot decode image ({e})") from e
        return arr

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        arr = self._read(i)
        if arr.shape != (self.size, self.size):
            raise CorruptFileError(
                f"{self.root / self.paths[i]}: image is {arr.shape[1]}x{arr.shape[0]}, "
                f"expected {self.size}x{self.size}"
            )
        return classification_item(arr.reshape(-1), self.labels[i])  # raster order
