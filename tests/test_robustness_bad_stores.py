"""Malformed and malicious stores: each is refused with the documented exception.

Every case starts from a valid store (or safetensors file, or accelerate offload folder),
damages it in one way, and checks that opening or reading it raises the exception class the
error model documents (``bigmodel.errors`` or the ``OSError`` family), with a message that
names the file and, where one is involved, the tensor. Nothing may crash the process, hang,
or hand out a tensor whose bytes are not the ones written.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zstandard
from _robustness import bits_equal, run_in_child

from bigmodel import _core
from bigmodel.errors import CorruptStoreError, IncompleteStoreError, StoreFormatError
from bigmodel.store import TensorStore, write_store

INDEX = _core.INDEX_FILE


def _base_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.randn(100, generator=generator),
        "e": torch.empty(0, 4),
        # Compressible but not trivial, so the frame has a few hundred bytes to damage.
        "z": (torch.arange(1000) % 37).to(torch.float32),
    }


@pytest.fixture
def store(tmp_path) -> Path:
    """A valid store: "a", "b" and "e" in one shard, "z" as a zstd frame in a blob file."""
    root = tmp_path / "store"
    write_store(root, _base_tensors(), codec={"z": "zstd"})
    return root


class Damage:
    """A store's index as a dict, plus the paths of its files, for the cases to edit."""

    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / INDEX
        self.index = json.loads(self.index_path.read_text())

    def entry(self, name: str) -> dict:
        return next(e for e in self.index["tensors"] if e["name"] == name)

    def file_of(self, name: str) -> Path:
        return self.root / self.index["files"][self.entry(name)["file"]]["path"]

    def set(self, name: str, **fields) -> None:
        """Sets fields of tensor ``name`` and saves the index."""
        self.entry(name).update(fields)
        self.save()

    def save(self) -> None:
        self.index_path.write_text(json.dumps(self.index))

    def write_index(self, data: bytes) -> None:
        self.index_path.write_bytes(data)


@dataclass(frozen=True)
class Expect:
    """The exception a damaged store must raise and words its message must contain."""

    error: type[BaseException]
    fragments: tuple[str, ...]


def index_error(damage: Damage, *words: str) -> Expect:
    return Expect(StoreFormatError, (str(damage.index_path), *words))


def tensor_error(error: type, file: Path, tensor: str, *words: str) -> Expect:
    return Expect(error, (str(file), f'"{tensor}"', *words))


# -- Damaged index documents: refused at open, naming the index (and the tensor) ----------

OPEN_CASES: dict[str, Callable[[Damage], Expect]] = {}


def case(function: Callable[[Damage], Expect]) -> Callable[[Damage], Expect]:
    OPEN_CASES[function.__name__] = function
    return function


@case
def index_is_not_json(d):
    d.write_index(b"{this is not json")
    return index_error(d, "not valid JSON")


@case
def index_is_truncated(d):
    d.write_index(d.index_path.read_bytes()[:200])
    return index_error(d, "not valid JSON")


@case
def index_is_empty(d):
    d.write_index(b"")
    return index_error(d, "not valid JSON")


@case
def index_is_binary_garbage(d):
    d.write_index(bytes(range(256)) * 4)
    return index_error(d, "not valid JSON")


@case
def index_is_a_json_array(d):
    d.write_index(b"[1, 2, 3]")
    return index_error(d, "not a JSON object")


@case
def index_nests_100000_deep(d):
    d.write_index(b"[" * 100_000 + b"]" * 100_000)
    return index_error(d, "not valid JSON")


@case
def index_has_a_duplicate_key(d):
    text = json.dumps(d.index)
    d.write_index(text.replace('"offset":', '"offset": 0, "offset":', 1).encode())
    return index_error(d, "appears twice")


@case
def index_of_another_format(d):
    d.index["format"] = "safetensors"
    d.save()
    return index_error(d, 'format is "safetensors"')


@case
def index_of_an_unknown_version(d):
    d.index["version"] = 2
    d.save()
    return index_error(d, "version 2 is not supported")


@case
def index_version_is_a_string(d):
    d.index["version"] = "1"
    d.save()
    return index_error(d, 'version "1" is not supported')


@case
def index_lacks_its_tensor_list(d):
    del d.index["tensors"]
    d.save()
    return index_error(d, "missing field `tensors`")


@case
def tensor_lacks_a_field(d):
    del d.entry("b")["offset"]
    d.save()
    return index_error(d, '"b"', "missing field `offset`")


@case
def offset_past_the_end_of_the_file(d):
    d.set("b", offset=d.file_of("b").stat().st_size)
    return tensor_error(StoreFormatError, d.file_of("b"), "b", "past the end of the file")


@case
def length_past_the_end_of_the_file(d):
    size = d.file_of("z").stat().st_size
    d.set("z", length=size + 64)
    return tensor_error(StoreFormatError, d.file_of("z"), "z", "past the end of the file")


@case
def offset_plus_length_overflows(d):
    d.set("b", offset=2**64 - 64)
    return tensor_error(StoreFormatError, d.file_of("b"), "b", "overflows")


@case
def overlapping_entries(d):
    d.set("b", offset=d.entry("a")["offset"])
    return Expect(StoreFormatError, (str(d.file_of("a")), '"a"', '"b"', "overlap"))


@case
def raw_length_disagrees_with_dtype_and_shape(d):
    d.set("a", raw_length=28, length=28)
    return index_error(d, '"a"', "needs 24 bytes")


@case
def uncompressed_length_differs_from_raw_length(d):
    d.set("a", length=64)
    return index_error(d, '"a"', "length 64 differs from raw_length 24")


@case
def shape_product_overflows(d):
    d.set("a", shape=[2**32, 2**32, 4])
    return index_error(d, '"a"', "overflows a 64-bit size")


@case
def negative_offset(d):
    d.set("a", offset=-64)
    return index_error(d, '"a"', "-64")


@case
def negative_dimension(d):
    d.set("a", shape=[-2, -3])
    return index_error(d, '"a"', "-2")


@case
def fractional_length(d):
    d.set("a", length=24.5)
    return index_error(d, '"a"', "floating point")


@case
def number_beyond_64_bits(d):
    d.set("a", offset=2**70)
    return index_error(d, '"a"', "floating point")


@case
def unknown_dtype(d):
    d.set("a", dtype="F17")
    return index_error(d, '"a"', 'unknown dtype "F17"')


@case
def unknown_codec(d):
    d.set("a", codec="lz4")
    return index_error(d, '"a"', "lz4")


@case
def checksum_is_not_hex(d):
    d.set("a", checksum="+0000000000000ff")
    return index_error(d, '"a"', "not 16 hex digits")


@case
def duplicate_tensor_names(d):
    d.entry("b")["name"] = "a"
    d.save()
    return index_error(d, '"a"', "listed twice")


@case
def file_position_out_of_range(d):
    d.set("a", file=7)
    return index_error(d, '"a"', "file position 7 is out of range")


@case
def misaligned_offset_in_a_written_shard(d):
    d.set("a", offset=d.entry("a")["offset"] + 4)
    return tensor_error(StoreFormatError, d.file_of("a"), "a", "not a multiple of 64")


@case
def file_name_with_dot_dot(d):
    d.index["files"][0]["path"] = "../outside.safetensors"
    d.save()
    return index_error(d, '"a"', "../outside.safetensors", "not a plain file name")


@case
def absolute_file_name_not_mounted(d):
    d.index["files"][0]["path"] = "/etc/passwd"
    d.save()
    return index_error(d, '"a"', "/etc/passwd", "not a plain file name")


@case
def file_name_in_a_subdirectory(d):
    d.index["files"][0]["path"] = "sub/shard.safetensors"
    d.save()
    return index_error(d, '"a"', "not a plain file name")


@case
def mounted_file_with_a_relative_name(d):
    d.index["files"][0]["mounted"] = True
    d.save()
    return index_error(d, '"a"', "mounted but not an absolute path")


@case
def symlink_to_an_absolute_path_outside(d):
    shard = d.file_of("a")
    outside = d.root.parent / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return index_error(d, '"a"', shard.name, "symlink that leads outside")


@case
def symlink_to_a_relative_path_outside(d):
    shard = d.file_of("a")
    shutil.move(shard, d.root.parent / "outside.safetensors")
    shard.symlink_to("../outside.safetensors")
    return index_error(d, '"a"', shard.name, "symlink that leads outside")


@case
def dangling_symlink(d):
    shard = d.file_of("a")
    shard.unlink()
    shard.symlink_to("nowhere.safetensors")
    return tensor_error(CorruptStoreError, shard, "a", "missing")


@case
def missing_shard(d):
    d.file_of("a").unlink()
    return tensor_error(CorruptStoreError, d.file_of("a"), "a", "missing")


@case
def missing_zstd_blob(d):
    d.file_of("z").unlink()
    return tensor_error(CorruptStoreError, d.file_of("z"), "z", "missing")


@case
def truncated_shard(d):
    shard = d.file_of("b")
    os.truncate(shard, shard.stat().st_size - 100)
    return tensor_error(CorruptStoreError, shard, "a", "truncated or rewritten")


@case
def truncated_zstd_blob(d):
    os.truncate(d.file_of("z"), 5)
    return tensor_error(CorruptStoreError, d.file_of("z"), "z", "truncated or rewritten")


@case
def shard_grown_after_the_write(d):
    with d.file_of("a").open("ab") as shard:
        shard.write(b"\0" * 64)
    return tensor_error(CorruptStoreError, d.file_of("a"), "a", "truncated or rewritten")


@case
def shard_replaced_by_a_directory(d):
    shard = d.file_of("a")
    shard.unlink()
    shard.mkdir()
    return tensor_error(StoreFormatError, shard, "a", "not a regular file")


@case
def shard_replaced_by_a_fifo(d):
    shard = d.file_of("a")
    shard.unlink()
    os.mkfifo(shard)
    return tensor_error(StoreFormatError, shard, "a", "not a regular file")


@case
def index_is_a_directory(d):
    d.index_path.unlink()
    d.index_path.mkdir()
    return index_error(d, "is a directory")


@case
def index_is_a_fifo(d):
    d.index_path.unlink()
    os.mkfifo(d.index_path)
    return index_error(d, "a FIFO")


@case
def index_larger_than_any_real_index(d):
    os.truncate(d.index_path, 2**30 + 1)  # sparse: costs no disk
    return index_error(d, "too large")


@case
def uncommitted_leftovers_without_an_index(d):
    d.index_path.unlink()
    leftover = d.root / ".tmp-0123456789abcdef-shard-00000.safetensors"
    leftover.write_bytes(b"\0" * 64)
    return Expect(IncompleteStoreError, (str(d.root), leftover.name))


@case
def empty_directory(d):
    shutil.rmtree(d.root)
    d.root.mkdir()
    return Expect(FileNotFoundError, (str(d.root), "not a bigmodel store"))


@case
def store_path_is_a_file(d):
    shutil.rmtree(d.root)
    d.root.write_bytes(b"\0" * 64)
    return Expect(StoreFormatError, (str(d.root), "is a file"))


def _unblock_if_still_waiting(fifo: Path, opened: threading.Event, intervened: list) -> None:
    """If the reader is still blocked on ``fifo`` after a while, opens its writing end so
    that the test fails instead of hanging, and records that it had to."""
    if not opened.wait(timeout=5) and fifo.exists():
        intervened.append(True)
        with open(fifo, "wb"):
            pass


@pytest.mark.parametrize("name", sorted(OPEN_CASES))
def test_a_damaged_store_is_refused_at_open(store, name):
    expect = OPEN_CASES[name](Damage(store))
    opened, intervened = threading.Event(), []
    guard_target = store / INDEX if name == "index_is_a_fifo" else None
    if guard_target is not None:
        guard = threading.Thread(
            target=_unblock_if_still_waiting, args=(guard_target, opened, intervened)
        )
        guard.start()
    try:
        with pytest.raises(expect.error) as caught:
            TensorStore.open(store)
    finally:
        opened.set()
        if guard_target is not None:
            guard.join()
    assert not intervened, "opening blocked on a FIFO"
    message = str(caught.value)
    for fragment in expect.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_there_are_at_least_thirty_distinct_open_cases():
    assert len(OPEN_CASES) >= 30


# -- Malformed safetensors files and offload folders, served in place by a mount ---------


def _safetensors(path: Path, header: dict | bytes, data_len: int, declared: int | None = None):
    """Writes a safetensors file by hand: length field, JSON header, ``data_len`` zero bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + text + bytes(data_len))
    return path


def _tensor(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _header_error(path: Path, *words: str) -> Expect:
    return Expect(StoreFormatError, (os.path.realpath(path), *words))


MOUNT_CASES: dict[str, Callable[[Path], tuple[object, Expect]]] = {}


def mount_case(function):
    MOUNT_CASES[function.__name__] = function
    return function


@mount_case
def header_length_past_the_end(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor()}, 8, declared=10**6)
    return [f], _header_error(f, "runs past the end of the file")


@mount_case
def header_length_beyond_the_limit(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor()}, 8, declared=2**40)
    return [f], _header_error(f, "exceeds the limit")


@mount_case
def file_shorter_than_the_length_field(tmp):
    f = tmp / "m.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    return [f], _header_error(f, "too short")


@mount_case
def header_is_not_json(tmp):
    f = _safetensors(tmp / "m.safetensors", b'{"w": [', 8)
    return [f], _header_error(f, "not valid JSON")


@mount_case
def header_is_a_json_array(tmp):
    f = _safetensors(tmp / "m.safetensors", b"[1, 2]", 8)
    return [f], _header_error(f, "not a JSON object")


@mount_case
def data_offsets_past_the_end(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor(offsets=(8, 16))}, 8)
    return [f], _header_error(f, '"w"', "outside the data section")


@mount_case
def data_offsets_reversed(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor(offsets=(8, 0))}, 8)
    return [f], _header_error(f, '"w"', "outside the data section")


@mount_case
def header_size_disagrees_with_dtype_and_shape(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor(shape=(3,))}, 8)
    return [f], _header_error(f, '"w"', "needs 12")


@mount_case
def header_shape_product_overflows(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor(shape=(2**33, 2**33))}, 8)
    return [f], _header_error(f, '"w"', "overflows")


@mount_case
def header_negative_dimension(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor(shape=(-2,))}, 8)
    return [f], _header_error(f, '"w"', "-2")


@mount_case
def header_unknown_dtype(tmp):
    f = _safetensors(tmp / "m.safetensors", {"w": _tensor(dtype="C64")}, 8)
    return [f], _header_error(f, '"w"', 'unknown dtype "C64"')


@mount_case
def header_overlapping_tensors(tmp):
    header = {"v": _tensor(offsets=(0, 8)), "w": _tensor(dtype="I16", shape=(2,), offsets=(6, 10))}
    f = _safetensors(tmp / "m.safetensors", header, 16)
    return [f], _header_error(f, '"v"', '"w"', "overlap")


@mount_case
def header_lists_a_name_twice(tmp):
    entry = json.dumps(_tensor(dtype="F32", shape=(1,), offsets=(0, 4)))
    later = json.dumps(_tensor(dtype="F32", shape=(1,), offsets=(4, 8)))
    f = _safetensors(tmp / "m.safetensors", f'{{"w": {entry}, "w": {later}}}'.encode(), 8)
    return [f], _header_error(f, '"w"', "appears twice")


@mount_case
def header_metadata_is_not_strings(tmp):
    f = _safetensors(tmp / "m.safetensors", {"__metadata__": {"step": 3}, "w": _tensor()}, 8)
    return [f], _header_error(f, "__metadata__")


@mount_case
def same_name_in_two_files(tmp):
    first = _safetensors(tmp / "a.safetensors", {"w": _tensor()}, 8)
    second = _safetensors(tmp / "b.safetensors", {"w": _tensor()}, 8)
    return [first, second], _header_error(second, '"w"', os.path.realpath(first))


@mount_case
def mounted_path_is_a_directory(tmp):
    (tmp / "d.safetensors").mkdir()
    return [tmp / "d.safetensors"], _header_error(tmp / "d.safetensors", "not a regular file")


@mount_case
def mounted_path_is_a_fifo(tmp):
    os.mkfifo(tmp / "p.safetensors")
    return [tmp / "p.safetensors"], _header_error(tmp / "p.safetensors", "not a regular file")


@mount_case
def mounted_file_is_missing(tmp):
    return [tmp / "gone.safetensors"], Expect(FileNotFoundError, ("gone.safetensors",))


def _offload_folder(tmp: Path) -> Path:
    from accelerate.utils import offload_state_dict

    folder = tmp / "offload"
    offload_state_dict(folder, {"w": torch.randn(4, 4), "b": torch.zeros(4)})
    return folder


def _edit_offload_index(folder: Path, edit: Callable[[dict], None]) -> Path:
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index))
    return index_path


@mount_case
def offload_index_is_not_json(tmp):
    folder = _offload_folder(tmp)
    (folder / "index.json").write_text("{")
    return folder, _header_error(folder / "index.json", "not a JSON object of tensors")


@mount_case
def offload_index_is_a_fifo(tmp):
    folder = _offload_folder(tmp)
    (folder / "index.json").unlink()
    os.mkfifo(folder / "index.json")
    return folder, _header_error(folder / "index.json", "a FIFO")


@mount_case
def offload_dat_has_the_wrong_size(tmp):
    folder = _offload_folder(tmp)
    os.truncate(folder / "w.dat", 60)
    dat = os.path.realpath(folder / "w.dat")
    return folder, Expect(CorruptStoreError, (dat, '"w"', "the file is 60 bytes"))


@mount_case
def offload_name_escapes_the_folder(tmp):
    folder = _offload_folder(tmp)
    index_path = _edit_offload_index(folder, lambda i: i.update({"../../etc/passwd": i["b"]}))
    return folder, _header_error(index_path, "../../etc/passwd", "cannot be a file name")


@mount_case
def offload_unsupported_dtype(tmp):
    folder = _offload_folder(tmp)
    index_path = _edit_offload_index(folder, lambda i: i["w"].update(dtype="complex64"))
    return folder, _header_error(index_path, '"w"', 'unsupported dtype "complex64"')


@mount_case
def offload_dat_is_missing(tmp):
    folder = _offload_folder(tmp)
    (folder / "w.dat").unlink()
    return folder, Expect(FileNotFoundError, ("w.dat",))


@mount_case
def offload_reference_to_a_missing_tensor(tmp):
    folder = _offload_folder(tmp)
    checkpoint = _safetensors(tmp / "ckpt.safetensors", {"v": _tensor()}, 8)
    reference = {"safetensors_file": str(checkpoint), "weight_name": "nope", "dtype": "float32"}
    _edit_offload_index(folder, lambda i: i.update({"r": reference}))
    return folder, _header_error(checkpoint, '"r"', 'no tensor "nope"')


@pytest.mark.parametrize("name", sorted(MOUNT_CASES))
def test_a_damaged_checkpoint_is_refused_at_mount(tmp_path, name):
    files, expect = MOUNT_CASES[name](tmp_path)
    with pytest.raises(expect.error) as caught:
        TensorStore.mount(files)
    message = str(caught.value)
    for fragment in expect.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# -- Valid indexes at the edges: served, not refused ---------------------------------------


def test_an_empty_store_opens_with_no_tensors(tmp_path):
    write_store(tmp_path / "s", {})
    with TensorStore.open(tmp_path / "s") as store:
        assert len(store) == 0
        assert store.verify() == []


def test_a_zero_length_file_of_empty_tensors_is_served(store):
    damage = Damage(store)
    (store / "empty.bin").write_bytes(b"")
    damage.index["files"].append({"path": "empty.bin", "size": 0})
    damage.set("e", file=len(damage.index["files"]) - 1, offset=0)
    with TensorStore.open(store) as opened:
        assert opened["e"].shape == (0, 4)
        assert bits_equal(opened["a"], _base_tensors()["a"])


def test_a_symlink_inside_the_store_is_followed(store):
    damage = Damage(store)
    shard = damage.file_of("a")
    target = shard.with_name("renamed.safetensors")
    shard.rename(target)
    shard.symlink_to(target.name)
    with TensorStore.open(store) as opened:
        for name, tensor in _base_tensors().items():
            assert bits_equal(opened[name], tensor), name


def test_a_damaged_shard_header_does_not_change_what_is_served(store):
    # The index is the authority: the safetensors header of our shards is for other tools.
    shard = Damage(store).file_of("a")
    with shard.open("r+b") as f:
        f.seek(8)
        f.write(b"#" * 16)
    with TensorStore.open(store, verify_reads=True) as opened:
        for name, tensor in _base_tensors().items():
            assert bits_equal(opened[name], tensor), name
        assert opened.verify() == []


# -- Damaged bytes: caught by verify(), by verify_reads, and (zstd) by the frame checksum --


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def test_a_flipped_byte_in_an_uncompressed_tensor_is_caught_by_checksums(store):
    damage = Damage(store)
    _flip_byte(damage.file_of("b"), damage.entry("b")["offset"] + 17)
    with TensorStore.open(store) as opened:
        assert opened.verify() == ["b"]
        # Without verify_reads a view is served as stored: that is the documented trade-off.
        assert not bits_equal(opened["b"], _base_tensors()["b"])
    with TensorStore.open(store, verify_reads=True) as opened:
        with pytest.raises(CorruptStoreError) as caught:
            opened["b"]
        assert str(damage.file_of("b")) in str(caught.value)
        assert '"b"' in str(caught.value) and "checksum" in str(caught.value)
        assert bits_equal(opened["a"], _base_tensors()["a"])


def test_every_flipped_byte_of_a_zstd_frame_is_caught_even_without_verify_reads(store):
    damage = Damage(store)
    blob, entry = damage.file_of("z"), damage.entry("z")
    pristine = blob.read_bytes()
    assert entry["length"] >= 100
    served_wrong, detected = [], 0
    for at in range(entry["offset"], entry["offset"] + entry["length"]):
        blob.write_bytes(pristine)
        _flip_byte(blob, at)
        with TensorStore.open(store) as opened:
            try:
                tensor = opened["z"]
            except CorruptStoreError as error:
                assert str(blob) in str(error) and '"z"' in str(error)
                assert opened.verify() == ["z"]
                detected += 1
                continue
            if not bits_equal(tensor, _base_tensors()["z"]):
                served_wrong.append(at)
    assert served_wrong == []
    assert detected >= entry["length"] - 2  # at most a flag bit zstd does not use


def _replace_frame(damage: Damage, frame: bytes) -> Path:
    """Puts ``frame`` in place of tensor "z"'s frame (the index records z's real sizes)."""
    blob = damage.file_of("z")
    blob.write_bytes(frame)
    damage.index["files"][damage.entry("z")["file"]]["size"] = len(frame)
    damage.set("z", offset=0, length=len(frame))
    return blob


BOMB_BYTES = 512 * 2**20


def _read_z_and_peak_growth(root: str, verify: bool) -> tuple[str, int]:
    """In a child: reads (or verifies) "z" and reports the error and the peak RSS growth."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with TensorStore.open(root) as opened:
        try:
            outcome = repr(opened.verify()) if verify else repr(opened["z"])
        except CorruptStoreError as error:
            outcome = f"CorruptStoreError: {error}"
    return outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


@pytest.mark.parametrize("announces_size", [True, False])
def test_a_zstd_bomb_never_allocates_more_than_recorded(store, announces_size):
    compressor = zstandard.ZstdCompressor(write_content_size=announces_size)
    bomb = compressor.compress(b"\0" * BOMB_BYTES)
    blob = _replace_frame(Damage(store), bomb)
    outcome, growth = run_in_child(_read_z_and_peak_growth, str(store), False)
    assert outcome.startswith("CorruptStoreError") and str(blob) in outcome, outcome
    reason = f"announces {BOMB_BYTES} bytes" if announces_size else "too small"
    assert reason in outcome
    assert growth < 64 * 2**20, f"peak memory grew by {growth} bytes"
    listed, growth = run_in_child(_read_z_and_peak_growth, str(store), True)
    assert listed == "['z']"
    assert growth < 64 * 2**20, f"verify grew peak memory by {growth} bytes"


@pytest.mark.parametrize("announces_size", [True, False])
def test_a_zstd_frame_shorter_than_recorded_is_corrupt(store, announces_size):
    compressor = zstandard.ZstdCompressor(write_content_size=announces_size)
    blob = _replace_frame(Damage(store), compressor.compress(b"\1" * 100))
    reason = "announces 100 bytes" if announces_size else "decodes to 100 bytes"
    with TensorStore.open(store) as opened:
        with pytest.raises(CorruptStoreError, match=reason) as caught:
            opened["z"]
        assert str(blob) in str(caught.value) and '"z"' in str(caught.value)
        assert opened.verify() == ["z"]


def test_a_huge_recorded_size_with_a_small_frame_is_corrupt_not_an_allocation(store):
    damage = Damage(store)
    damage.set("z", shape=[2**40], raw_length=4 * 2**40)
    with (
        TensorStore.open(store) as opened,
        pytest.raises(CorruptStoreError, match="announces 4000 bytes.*records 4398"),
    ):
        opened["z"]


def test_garbage_in_place_of_a_frame_is_corrupt(store):
    _replace_frame(Damage(store), b"definitely not zstd" * 4)
    with TensorStore.open(store) as opened:
        with pytest.raises(CorruptStoreError, match='"z".*zstd frame header'):
            opened["z"]
        assert opened.verify() == ["z"]


# -- Unreadable files: root reads everything, so the check runs as an unprivileged user ----

NOBODY = 65534


def _open_as_nobody(root: str) -> str:
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:
        TensorStore.open(root)
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return "opened"


@pytest.mark.parametrize("unreadable", ["index", "shard"])
def test_an_unreadable_file_is_a_permission_error_naming_it(unreadable):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user (any user can chmod)")
    # Outside pytest's private temporary directory, which an unprivileged user cannot enter.
    parent = Path(tempfile.mkdtemp(prefix="bigmodel-perm-"))
    try:
        parent.chmod(0o755)
        write_store(parent / "s", _base_tensors())
        target = parent / "s" / INDEX if unreadable == "index" else next(parent.glob("s/*shard*"))
        target.chmod(0o000)
        outcome = run_in_child(_open_as_nobody, str(parent / "s"))
        assert outcome.startswith("PermissionError") and str(target) in outcome, outcome
    finally:
        shutil.rmtree(parent)
