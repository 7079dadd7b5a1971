"""Data of `svdkern train`: digits split, CIFAR-10 readers (both formats), the restricted
unpickler, deterministic and shardable batches, augmentation, byte-level text (from a
directory and the standard library's sources)."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch

from svdkern.train import data
from svdkern.train.data import (
    CIFAR_BIN,
    CIFAR_PY,
    DataError,
    bits_per_byte,
    load_array_pickle,
    read_cifar10,
)

RECORDS = 3  # images per tiny batch file


def _tiny_batches(seed: int = 0) -> list[tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, 256, (RECORDS, 3072), dtype=np.uint8),
            rng.integers(0, 10, RECORDS).tolist(),
        )
        for _ in range(6)
    ]


def _write_bin(directory, batches) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in zip(CIFAR_BIN, batches, strict=True):
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], pixels], axis=1)
        (directory / name).write_bytes(records.tobytes())


def _write_py(directory, batches, protocol: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in zip(CIFAR_PY, batches, strict=True):
        batch = {b"batch_label": b"tiny", b"labels": labels, b"data": pixels, b"filenames": []}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))


def _expected(batches):
    x_train = np.concatenate([p for p, _ in batches[:5]]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([lab for _, lab in batches[:5]])
    return x_train, y_train, batches[5][0].reshape(-1, 3, 32, 32), np.array(batches[5][1])


def _check_read(root, batches) -> None:
    x_train, y_train, x_test, y_test = read_cifar10(str(root))
    ex_train, ey_train, ex_test, ey_test = _expected(batches)
    assert x_train.dtype == torch.uint8 and x_train.shape == (5 * RECORDS, 3, 32, 32)
    assert np.array_equal(x_train.numpy(), ex_train)
    assert np.array_equal(y_train.numpy(), ey_train)
    assert np.array_equal(x_test.numpy(), ex_test)
    assert np.array_equal(y_test.numpy(), ey_test)


def test_cifar10_binary_reader_matches_written_records(tmp_path):
    batches = _tiny_batches()
    _write_bin(tmp_path / "cifar-10-batches-bin", batches)
    _check_read(tmp_path / "cifar-10-batches-bin", batches)
    _check_read(tmp_path, batches)  # the parent directory works too


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL], ids=["proto2", "proto-highest"])
def test_cifar10_python_reader_matches_written_pickles(tmp_path, protocol):
    batches = _tiny_batches(1)
    _write_py(tmp_path / "cifar-10-batches-py", batches, protocol)
    _check_read(tmp_path / "cifar-10-batches-py", batches)
    _check_read(tmp_path, batches)


def test_cifar10_dataset_normalizes_and_augments(tmp_path):
    _write_bin(tmp_path, _tiny_batches())
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.augment and ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    x, y = next(data.train_batches(ds, 4, 0, 0, 0, torch.device("cpu")))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.shape == (4,)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global .*system"):
        load_array_pickle(payload)
    batches = _tiny_batches()
    _write_py(tmp_path / "d", batches)
    (tmp_path / "d" / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match=r"data_batch_3.*refusing"):
        read_cifar10(str(tmp_path / "d"))
    assert not marker.exists()


_FROMBUFFER = np._core.numeric._frombuffer  # what numpy pickles arrays with (protocol 5)


class _Call:
    """Pickles as fn(*args): the shape of a crafted pickle."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _ForgedDtype:
    """A structured dtype whose pickled state puts field 'a' `offset` bytes into an 8-byte item."""

    def __init__(self, offset):
        self.offset = offset

    def __reduce__(self):
        fn, args, state = np.dtype({"names": ["a"], "formats": ["<u8"], "itemsize": 8}).__reduce__()
        state = list(state)
        state[4] = {"a": (np.dtype("<u8"), self.offset)}
        return fn, args, tuple(state)


@pytest.mark.parametrize(
    "payload, match",
    [
        # An object array whose 'pointers' are attacker bytes: dereferencing them crashes.
        pytest.param(
            _Call(np.ndarray, ((1,), np.dtype("O"), b"A" * 8)), "dtype 'O8'", id="object-array"
        ),
        # A field offset past the item reads memory outside the pickle's own data.
        pytest.param(
            _Call(_FROMBUFFER, (b"B" * 8, _ForgedDtype(4096), (1,), "C")),
            "dtype 'V8'",
            id="field-offset",
        ),
        # Data shorter than the shape claims.
        pytest.param(
            _Call(_FROMBUFFER, (b"\0" * 8, np.dtype("<i4"), (4,), "C")),
            "array data of 8 bytes",
            id="short-data",
        ),
    ],
)
def test_restricted_unpickler_refuses_forged_arrays(payload, match):
    data = pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=match):
        load_array_pickle(data)


def test_restricted_unpickler_loads_arrays_lists_dicts_strings_numbers():
    value = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": [1, 2.5, "x"], "c": None}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        out = load_array_pickle(pickle.dumps(value, protocol=protocol))
        assert np.array_equal(out[b"a"], value[b"a"]) and out["b"] == value["b"]


def test_missing_cifar_dir_lists_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"not a directory.*data_batch_1.bin.*test_batch"):
        read_cifar10(str(tmp_path / "nope"))
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"no complete CIFAR-10 set.*data_batch_5.bin.*found: "):
        read_cifar10(str(tmp_path))


def test_malformed_cifar_binary_is_refused(tmp_path):
    _write_bin(tmp_path, _tiny_batches())
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="whole number of CIFAR-10 records"):
        read_cifar10(str(tmp_path))


def test_digits_split_is_fixed_and_stratified():
    a, b = data.load_dataset("digits"), data.load_dataset("digits")
    assert len(a.y_train) == 1437 and len(a.y_test) == 360
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert a.input_shape == (1, 8, 8)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35


def _epoch(ds, seed, phase, epoch, rank=0, world=1, batch=32):
    return list(data.train_batches(ds, batch, seed, phase, epoch, torch.device("cpu"), rank, world))


def test_batches_depend_only_on_seed_phase_epoch():
    ds = data.load_dataset("synthetic")
    a, b = _epoch(ds, 0, 1, 2), _epoch(ds, 0, 1, 2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = _epoch(ds, 0, 1, 3)
    assert not torch.equal(a[0][0], c[0][0])
    assert len(a) == len(ds.y_train) // 32


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_batches_union_equals_the_global_batch(world):
    ds = data.load_dataset("synthetic")
    full = _epoch(ds, 3, 0, 1)
    shards = [_epoch(ds, 3, 0, 1, rank, world) for rank in range(world)]
    assert all(len(s) == len(full) for s in shards)
    for i, (x, _) in enumerate(full):
        parts = torch.cat([s[i][0] for s in shards])
        assert parts.shape == x.shape
        key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
        assert key(parts) == key(x)


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    same = data._augment(x, torch.tensor([[4, 4], [4, 4]]), torch.tensor([False, True]))
    assert torch.equal(same[0], x[0])
    assert torch.equal(same[1], x[1].flip(-1))
    shifted = data._augment(x, torch.tensor([[5, 3], [0, 0]]), torch.tensor([False, False]))
    assert torch.equal(shifted[0, :, :3, 1:], x[0, :, 1:, :3])
    assert shifted[0, :, 3].abs().sum() == 0 and shifted[0, :, :, 0].abs().sum() == 0


# --- text ------------------------------------------------------------------------------

CPU = torch.device("cpu")


def _corpus(root, files: int = 12) -> dict[str, bytes]:
    """`files` text files of different lengths under `root` (some in subdirectories), plus
    a binary file, a hidden file and a hidden directory that are not read."""
    texts = {}
    for i in range(files):
        rel = f"part{i % 3}/doc{i:02d}.txt" if i % 2 else f"doc{i:02d}.md"
        texts[rel] = (f"file {i}: " + "héllo wörld " * (20 + 7 * i)).encode()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(texts[rel])
    (root / "image.bin").write_bytes(bytes(range(256)) * 4)
    (root / ".notes").write_bytes(b"hidden " * 100)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n" * 100)
    return texts


def _stream(texts: dict[str, bytes], names) -> torch.Tensor:
    return torch.tensor(list(b"\0".join(texts[n] for n in names)), dtype=torch.int64)


def _check_windows(x: torch.Tensor, y: torch.Tensor, stream: torch.Tensor, seq_len: int):
    n = (len(stream) - 1) // seq_len
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x.shape == y.shape == (n, seq_len)
    assert torch.equal(x.flatten().long(), stream[: n * seq_len])
    assert torch.equal(y.flatten(), stream[1 : n * seq_len + 1])


def test_text_dir_is_split_by_file_into_shifted_windows(tmp_path):
    texts = _corpus(tmp_path)
    ds = data.load_dataset("text", str(tmp_path), seq_len=16)
    assert ds.task == "lm" and ds.num_classes == 256 and ds.input_shape == (16,)
    assert set(ds.train_files) | set(ds.test_files) == set(texts)
    assert not set(ds.train_files) & set(ds.test_files) and ds.test_files
    assert list(ds.train_files) == sorted(ds.train_files)
    _check_windows(ds.x_train, ds.y_train, _stream(texts, ds.train_files), 16)
    _check_windows(ds.x_test, ds.y_test, _stream(texts, ds.test_files), 16)
    held = sum(len(texts[n]) for n in ds.test_files) / sum(map(len, texts.values()))
    assert 0.0 < held <= 0.1
    again = data.load_dataset("text", str(tmp_path), seq_len=16)
    assert again.train_files == ds.train_files and torch.equal(again.x_train, ds.x_train)


def test_text_single_file_is_split_by_bytes(tmp_path):
    raw = bytes(range(32, 127)) * 10
    (tmp_path / "input.txt").write_bytes(raw)
    ds = data.load_dataset("text", str(tmp_path), seq_len=8)
    assert ds.train_files == ds.test_files == ("input.txt",)
    cut = len(raw) - math.ceil(0.1 * len(raw))
    _check_windows(ds.x_train, ds.y_train, torch.tensor(list(raw[:cut])), 8)
    _check_windows(ds.x_test, ds.y_test, torch.tensor(list(raw[cut:])), 8)


def test_text_max_bytes_cuts_files_in_sorted_order(tmp_path):
    texts = _corpus(tmp_path)
    ds = data.load_dataset("text", str(tmp_path), seq_len=4, max_bytes=1000)
    read = sorted(ds.train_files + ds.test_files)
    assert read == sorted(texts)[: len(read)] and len(read) < len(texts)
    windows = len(ds.x_train) + len(ds.x_test)
    assert windows * 4 <= 1000 + len(read)  # the NUL bytes between files


def test_text_batches_are_token_ids_and_follow_the_epoch_order(tmp_path):
    _corpus(tmp_path)
    ds = data.load_dataset("text", str(tmp_path), seq_len=16)
    a, b = _epoch(ds, 0, 1, 2, batch=8), _epoch(ds, 0, 1, 2, batch=8)
    assert len(a) == data.steps_per_epoch(ds, 8) == len(ds.y_train) // 8
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], _epoch(ds, 0, 1, 3, batch=8)[0][0])
    x, y = a[0]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x, y = next(data.eval_batches(ds, CPU))
    assert x.dtype == torch.int64 and torch.equal(x, ds.x_test[: len(x)].long())
    assert torch.equal(ds.example(2), ds.x_test[:2].long())


def test_text_default_is_a_bounded_stdlib_subset():
    ds = data.load_dataset("text")
    files = ds.train_files + ds.test_files
    assert not set(ds.train_files) & set(ds.test_files)
    assert all(f.endswith(".py") for f in files)
    assert not any(p in f.split("/") for f in files for p in ("site-packages", "test"))
    assert (len(ds.x_train) + len(ds.x_test)) * 64 <= data.MAX_BYTES
    assert len(ds.x_train) > 1000 and 0.05 < len(ds.x_test) / len(ds.x_train) < 0.2
    again = data.load_dataset("text")
    assert again.test_files == ds.test_files and torch.equal(again.y_test, ds.y_test)


def test_text_dir_without_text_is_refused(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"--data-dir {missing}: not a directory.*text files"):
        data.load_dataset("text", str(missing))
    empty = tmp_path / "empty"
    (empty / ".git").mkdir(parents=True)
    (empty / ".git" / "config").write_text("[core]\n")
    (empty / "blank.txt").write_bytes(b"")
    with pytest.raises(DataError, match=rf"--data-dir {empty}: no text.*found no files"):
        data.load_dataset("text", str(empty))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (binary / "b.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match=rf"--data-dir {binary}: no text.*a.png, b.txt"):
        data.load_dataset("text", str(binary))
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("short")
    with pytest.raises(DataError, match=rf"--data-dir {small}: too little text.*seq_len \+ 1 = 65"):
        data.load_dataset("text", str(small))


def test_bits_per_byte_of_a_uniform_byte_is_eight():
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
