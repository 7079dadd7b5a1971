"""Data sets of `svdkern train`: bundled digits, CIFAR-10 from disk, synthetic, and
byte-level text for language modelling.

All of a data set lives in memory as tensors; batches are gathered by index.
The training order of an epoch is a function of (seed, phase, epoch) only, drawn
by `torch.utils.data.DistributedSampler` with `drop_last`, so a resumed run and a
run under torchrun (N processes, per-process batch = global / N) see the same global
batches as an uninterrupted single-process run. CIFAR-10 augmentation (4-pixel
zero-pad random crop, horizontal flip) is drawn per epoch for every sample, keyed
the same way.

CIFAR-10's python version is a set of pickles; they are read by `_ArrayUnpickler`,
which builds only numpy arrays, lists, dicts, strings and numbers and refuses every
other global (a pickle that would call `os.system` raises instead of running).

Text (`load_dataset("text", data_dir)`) is read as bytes (vocabulary 256, no tokenizer).
The files read are every regular file under `data_dir`, recursively, whose bytes are UTF-8
without a NUL byte (other files are skipped; hidden files and directories, names starting
with ".", and __pycache__ are not entered); without `data_dir`, the `*.py` files of the
Python standard library (`sysconfig.get_paths()["stdlib"]`, without site-packages,
dist-packages and the test directories). Files are taken in sorted relative-path order up
to `max_bytes` (the last one cut) and split by file: in the order of the SHA-1 of their
relative paths, each file that still fits goes to the validation set, up to 10 % of the
bytes (a single file is split by bytes instead: its last 10 %). Each split's files are
joined with a NUL byte between them (the end of a document) and cut into windows of
seq_len + 1 bytes that overlap by one byte: window i is bytes [i·seq_len, (i+1)·seq_len],
its input the first seq_len bytes, its target the last seq_len, so every byte is predicted
once per epoch.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import math
import os
import pickle
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = [
    "DataError",
    "Dataset",
    "bits_per_byte",
    "eval_batches",
    "load_dataset",
    "read_cifar10",
    "train_batches",
]

CIFAR_BIN = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR_PY = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_RECORD = 1 + 3 * 32 * 32
SEQ_LEN = 64
MAX_BYTES = 2 * 2**20
_VALIDATION = 0.1
_STDLIB_SKIP = frozenset(["site-packages", "dist-packages", "test", "tests", "idle_test"])


class DataError(ValueError):
    """A data set that cannot be read; the message says what was expected."""


@dataclass
class Dataset:
    """A data set in memory: classification (task "classification") or next-byte
    prediction (task "lm").

    classification:
        x_train, x_test: (N, C, H, W), uint8 (CIFAR-10, normalised per batch) or float32.
        y_train, y_test: (N,) int64 class indices in [0, num_classes).
    lm (num_classes = 256, mean = std = ()):
        x_train, x_test: (N, seq_len) uint8 bytes, int64 token ids once normalised.
        y_train, y_test: (N, seq_len) int64, y[:, t] = the byte after x[:, t].
        source: the directory read; train_files, test_files: the relative paths each
        split was built from (one file split by bytes is in both).

    A model maps a normalised batch x to logits (*y.shape, num_classes); the loss is
    F.cross_entropy(logits.flatten(0, -2), y.flatten()) for both tasks.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    task: str = "classification"
    source: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    # Samples per training epoch (None: the whole training set): an epoch of a large set
    # is then a fresh random subset of this many samples, keyed like the whole order.
    epoch_size: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image, (seq_len,) of one text window."""
        return tuple(self.x_train.shape[1:])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as the model takes them. Images: float32, (x/255 if uint8 − mean) / std
        per channel; text: int64 token ids."""
        if self.task == "lm":
            return x.long()
        x = x.float()
        if self.x_train.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def example(self, batch: int = 1) -> torch.Tensor:
        """The first `batch` test samples, normalised: the example input of `svdkern.flops`,
        `prune` and `compress` (`example_inputs=(ds.example(),)`), valid for every task."""
        return self.normalize(self.x_test[:batch])


def bits_per_byte(loss_nats: float) -> float:
    """Mean cross-entropy per byte in nats → bits per byte: loss / ln 2 (one token is one
    byte)."""
    return loss_nats / math.log(2)


# --- the data sets ----------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    seq_len: int = SEQ_LEN,
    max_bytes: int = MAX_BYTES,
    epoch_size: int | None = None,
) -> Dataset:
    """`digits`, `cifar10` (from `data_dir`), `synthetic` or `text` (from `data_dir`, or the
    standard library's Python sources without it; windows of `seq_len` bytes from at most
    `max_bytes` bytes of text, see the module docstring). The image data sets ignore
    `seq_len` and `max_bytes`. `epoch_size`: samples per training epoch (default all)."""
    ds = _load(name, data_dir, seq_len, max_bytes)
    if epoch_size is not None:
        if epoch_size < 1:
            raise DataError(f"epoch_size must be a positive number of samples, got {epoch_size}")
        ds.epoch_size = min(epoch_size, len(ds.y_train))
    return ds


def _load(name: str, data_dir: str | None, seq_len: int, max_bytes: int) -> Dataset:
    if name == "text":
        return _text(data_dir, seq_len=seq_len, max_bytes=max_bytes)
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic()
    if name == "cifar10":
        if data_dir is None:
            raise DataError(
                "--data cifar10 needs --data-dir DIR with the CIFAR-10 files: "
                f"{', '.join(CIFAR_BIN)} (binary version) or {', '.join(CIFAR_PY)} (python version)"
            )
        x_train, y_train, x_test, y_test = read_cifar10(data_dir)
        return Dataset(
            "cifar10", x_train, y_train, x_test, y_test, 10, _CIFAR_MEAN, _CIFAR_STD, augment=True
        )
    raise DataError(f"unknown data set {name!r}; expected digits, cifar10, synthetic or text")


def _digits() -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return Dataset(
        "digits",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        10,
        (mean,),
        (std,),
    )


def _synthetic(n_train: int = 320, n_test: int = 160, classes: int = 10) -> Dataset:
    """Ten noisy 1×8×8 prototypes: learnable in a few epochs; for tests."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(classes, 1, 8, 8, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        x = protos[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Dataset("synthetic", x_tr, y_tr, x_te, y_te, classes, (0.0,), (1.0,))


# --- text ------------------------------------------------------------------------------


def _text(
    data_dir: str | None = None, *, seq_len: int = SEQ_LEN, max_bytes: int = MAX_BYTES
) -> Dataset:
    """The byte-level language-modelling set of `data_dir` (the standard library's Python
    sources without it): see the module docstring for which files, the split and the
    windows. DataError when there is no text, or too little for one window per split."""
    for arg, value in (("seq_len", seq_len), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if data_dir is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        where, what = str(root), "the standard library's *.py files"
        paths = _walk(root, ".py", _STDLIB_SKIP)
    else:
        root = Path(data_dir)
        where, what = f"--data-dir {data_dir}", "text files (UTF-8 without NUL bytes)"
        if not root.is_dir():
            raise DataError(
                f"{where}: not a directory; --data text expects a directory of {what}, "
                "read recursively"
            )
        paths = _walk(root, "", frozenset())
    texts, skipped = _read_texts(root, paths, max_bytes)
    if not texts:
        found = f"only non-text files, e.g. {', '.join(skipped[:5])}" if skipped else "no files"
        raise DataError(f"{where}: no text to read; expected {what} there, found {found}")
    train, test = _split_by_file(texts)
    x_train, y_train = _windows(list(train.values()), seq_len)
    x_test, y_test = _windows(list(test.values()), seq_len)
    if len(x_train) == 0 or len(x_test) == 0:
        sizes = f"{sum(map(len, train.values()))} and {sum(map(len, test.values()))}"
        raise DataError(
            f"{where}: too little text; the training and validation splits hold {sizes} "
            f"bytes, and each needs at least seq_len + 1 = {seq_len + 1} for one window"
        )
    return Dataset(
        "text",
        x_train,
        y_train,
        x_test,
        y_test,
        256,
        (),
        (),
        task="lm",
        source=str(root),
        train_files=tuple(train),
        test_files=tuple(test),
    )


def _walk(root: Path, suffix: str, skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every regular file under `root` whose name ends with
    `suffix`, sorted by relative path; hidden entries, __pycache__ and `skip_dirs` are not
    entered."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and d != "__pycache__" and d not in skip_dirs
        ]
        for name in files:
            path = Path(directory, name)
            if not name.startswith(".") and name.endswith(suffix) and path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _read_texts(
    root: Path, paths: list[tuple[str, Path]], max_bytes: int
) -> tuple[dict[str, bytes], list[str]]:
    """({relative path: bytes} of the text files, in order, until `max_bytes` are read (the
    last file cut), [relative paths of the files skipped as not text])."""
    texts: dict[str, bytes] = {}
    skipped: list[str] = []
    left = max_bytes
    for rel, path in paths:
        if left == 0:
            break
        try:
            with open(path, "rb") as f:
                raw = f.read(left)
        except OSError as exc:
            raise DataError(f"{root}: cannot read {rel}: {exc.strerror}") from None
        if not raw:
            continue
        if not _is_text(raw):
            skipped.append(rel)
            continue
        texts[rel] = raw
        left -= len(raw)
    return texts, skipped


def _is_text(raw: bytes) -> bool:
    """UTF-8 without a NUL byte (a code point cut at the end of `raw` is allowed)."""
    if b"\0" in raw:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _split_by_file(texts: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(training texts, validation texts) by relative path, in sorted order. In the order
    of the SHA-1 of their relative paths, each file that still fits validates, up to 10 % of
    the bytes (the first file if none fits). One file is split by bytes: its last ⌈10 %⌉
    validates, the rest trains."""
    names = sorted(texts)
    if len(names) == 1:
        (name,) = names
        raw = texts[name]
        cut = len(raw) - math.ceil(_VALIDATION * len(raw))
        return {name: raw[:cut]}, {name: raw[cut:]}
    ranked = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    share = _VALIDATION * sum(map(len, texts.values()))
    test: set[str] = set()
    held = 0
    for name in ranked:
        if held + len(texts[name]) <= share:
            test.add(name)
            held += len(texts[name])
    test = test or {ranked[0]}
    return (
        {n: texts[n] for n in names if n not in test},
        {n: texts[n] for n in names if n in test},
    )


def _windows(parts: list[bytes], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x uint8 (N, seq_len), y int64 (N, seq_len)) of `parts` joined by NUL bytes:
    window i covers bytes [i·seq_len, (i+1)·seq_len], x its first seq_len, y its last."""
    stream = np.frombuffer(b"\0".join(parts), dtype=np.uint8)
    n = max(0, (len(stream) - 1) // seq_len)
    x = stream[: n * seq_len].reshape(n, seq_len)
    y = stream[1 : n * seq_len + 1].reshape(n, seq_len)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


# --- CIFAR-10 ----------------------------------------------------------------------------


def _cifar_dir(data_dir: str) -> tuple[Path, str]:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"--data-dir {data_dir}: not a directory; expected a directory with the CIFAR-10 "
            f"files {', '.join(CIFAR_BIN)} (binary version) or {', '.join(CIFAR_PY)} "
            "(python version), or its parent holding cifar-10-batches-bin/ or cifar-10-batches-py/"
        )
    for d in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if all((d / f).is_file() for f in CIFAR_BIN):
            return d, "bin"
        if all((d / f).is_file() for f in CIFAR_PY):
            return d, "py"
    present = sorted(p.name for p in root.iterdir())[:20]
    raise DataError(
        f"--data-dir {data_dir}: no complete CIFAR-10 set found; expected the files "
        f"{', '.join(CIFAR_BIN)} (binary version) or {', '.join(CIFAR_PY)} (python version) "
        f"in {data_dir} or in its cifar-10-batches-bin/ or cifar-10-batches-py/; "
        f"found: {', '.join(present) or 'nothing'}"
    )


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records "
            f"(1 label byte + 3072 pixel bytes = {_RECORD} bytes each)"
        )
    records = raw.reshape(-1, _RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} is not a CIFAR-10 class (0..9)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


# Plain numeric dtypes: all a CIFAR-10 batch (or any batch of numbers) needs. Object and
# structured dtypes are refused: their pickled state can forge pointers or field offsets.
_SAFE_DTYPES = frozenset(["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"])


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(
        f"refusing {what}: a CIFAR-10 batch holds only arrays of plain numbers, lists, dicts, "
        "strings and numbers"
    )


class _Dtype:
    """Stands in for numpy.dtype(name, align, copy) while unpickling; only plain numeric
    dtypes, whose pickled state may set nothing but the byte order."""

    def __init__(self, name, align=False, copy=True) -> None:
        if isinstance(name, bytes):
            name = name.decode("latin1")
        if not isinstance(name, str) or name not in _SAFE_DTYPES:
            raise _refuse(f"dtype {name!r}")
        self.dtype = np.dtype(name)

    def __setstate__(self, state) -> None:
        # numpy's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(v is not None for v in state[2:5]):
            raise _refuse("a dtype with fields or subarrays")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise _refuse(f"dtype byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _array(raw, dtype, shape, fortran: bool = False) -> np.ndarray:
    """A new array of `shape` copied from the bytes `raw`, which must fill it exactly."""
    if not isinstance(dtype, _Dtype):
        raise _refuse("an array without a plain numeric dtype")
    if isinstance(raw, str):  # Python 2 pickles read with encoding="bytes" give bytes; be safe
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray, pickle.PickleBuffer)):
        raise _refuse(f"array data of type {type(raw).__name__}")
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _refuse(f"array shape {shape!r}")
    raw = bytes(raw)
    if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
        raise _refuse(f"array data of {len(raw)} bytes for shape {shape} of {dtype.dtype}")
    flat = np.frombuffer(raw, dtype=dtype.dtype).copy()
    return flat.reshape(shape, order="F" if fortran else "C")


class _ArrayState:
    """Stands in for numpy.core.multiarray._reconstruct(...): the array is built from the
    pickled state (shape, dtype, raw bytes) alone and swapped in after loading."""

    def __init__(self, subtype=None, shape=None, typecode=None) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _refuse("an ndarray state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array(raw, dtype, shape, bool(fortran))


def _frombuffer(buf, dtype, shape, order) -> np.ndarray:
    return _array(buf, dtype, shape, order == "F")


def _scalar(dtype, raw=None):
    return _array(raw, dtype, ())[()]


_NDARRAY = object()  # numpy.ndarray only ever appears as _reconstruct's (ignored) subtype

_GLOBALS = {
    **dict.fromkeys(
        [("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")],
        _ArrayState,
    ),
    **dict.fromkeys(
        [("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")], _scalar
    ),
    **dict.fromkeys(
        [("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")],
        _frombuffer,
    ),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    # Protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only arrays of plain numbers, lists, dicts, strings and numbers.

    Every global a pickle may name is replaced by a stand-in of this module: arrays are
    rebuilt from their shape, plain numeric dtype and raw bytes (whose length must match),
    so a crafted pickle can neither run code (e.g. `os.system`) nor forge object pointers
    or field offsets that read outside its own data.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise _refuse(f"global {module}.{name}")


def _resolve(obj):
    """`obj` with every _ArrayState replaced by its array; anything else stand-in is refused."""
    if isinstance(obj, _ArrayState):
        if obj.array is None:
            raise _refuse("an ndarray without state")
        return obj.array
    if isinstance(obj, dict):
        return {_resolve(k): _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    if isinstance(obj, (str, bytes, int, float, bool, np.ndarray, np.generic)) or obj is None:
        return obj
    raise _refuse(f"an object of type {type(obj).__name__}")


def load_array_pickle(data: bytes) -> object:
    """Unpickle `data` with the restricted `_ArrayUnpickler` (bytes keys kept as bytes)."""
    return _resolve(_ArrayUnpickler(io.BytesIO(data), encoding="bytes").load())


def _read_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = load_array_pickle(path.read_bytes())
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: expected b'data' as a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3072 or labels is None or len(labels) != data.shape[0]:
        raise DataError(
            f"{path}: expected b'data' (N, 3072) and b'labels' of length N, got data "
            f"{data.shape} and {None if labels is None else len(labels)} labels"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels must be CIFAR-10 classes 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train uint8 (N, 3, 32, 32), y_train, x_test, y_test) from the binary or python files."""
    d, kind = _cifar_dir(data_dir)
    names, read = (CIFAR_BIN, _read_bin) if kind == "bin" else (CIFAR_PY, _read_py)
    parts = [read(d / name) for name in names]
    x_train = np.concatenate([x for x, _ in parts[:5]])
    y_train = np.concatenate([y for _, y in parts[:5]])
    x_test, y_test = parts[5]
    return (
        torch.from_numpy(np.ascontiguousarray(x_train)),
        torch.from_numpy(y_train),
        torch.from_numpy(np.ascontiguousarray(x_test)),
        torch.from_numpy(y_test),
    )


# --- batches -----------------------------------------------------------------------------


def epoch_seed(seed: int, phase: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation."""
    return (seed * 1_000_003 + phase * 10_007 + epoch) % (2**62)


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    """Optimizer steps of one epoch: the epoch's samples (all, or `ds.epoch_size`) // the
    global batch."""
    return (ds.epoch_size or len(ds.y_train)) // batch_size


def _augment(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop of the 4-pixel zero-padded image at (dy, dx) = shifts, then flip."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    rows = (shifts[:, 0:1] + torch.arange(h)).view(n, 1, h, 1)
    across = torch.arange(w).expand(n, w)
    across = torch.where(flips.view(n, 1), w - 1 - across, across)
    cols = (shifts[:, 1:2] + across).view(n, 1, 1, w)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


def train_batches(
    ds: Dataset,
    batch_size: int,
    seed: int,
    phase: int,
    epoch: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's training batches of one epoch (batch_size is the global batch).

    Global batch i is the same set of samples whatever `world` is: DistributedSampler
    interleaves one permutation over the processes, and each takes batch_size / world.
    """
    n = len(ds.y_train)
    key = epoch_seed(seed, phase, epoch)
    sampler = DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=True, seed=key, drop_last=True
    )
    sampler.set_epoch(0)
    indices = torch.tensor(list(sampler), dtype=torch.long)
    local = batch_size // world
    if ds.augment:
        g = torch.Generator().manual_seed(key)
        shifts = torch.randint(0, 9, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
    for i in range(steps_per_epoch(ds, batch_size)):
        idx = indices[i * local : (i + 1) * local]
        x = ds.x_train[idx]
        if ds.augment:
            x = _augment(x, shifts[idx], flips[idx])
        yield ds.normalize(x.to(device)), ds.y_train[idx].to(device)


def eval_batches(
    ds: Dataset, device: torch.device, batch_size: int = 500
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole test set in order."""
    for i in range(0, len(ds.y_test), batch_size):
        yield (
            ds.normalize(ds.x_test[i : i + batch_size].to(device)),
            ds.y_test[i : i + batch_size].to(device),
        )
