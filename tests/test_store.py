"""The Python store API: round trips, zero copy, lifetimes, formats readable by other tools."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import zstandard

from bigmodel import _core
from bigmodel.errors import IncompleteStoreError, TensorNotFoundError
from bigmodel.store import TensorStore, write_mount, write_store

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(
        dtype
    )


def _sample_tensors() -> dict[str, torch.Tensor]:
    tensors = {f"t.{str(d)[6:]}": _random(d, (3, 5), seed=i) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.empty(0, 4)
    tensors["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    tensors["odd.size"] = torch.arange(7, dtype=torch.int8)
    return tensors


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN-safe, float8-safe): compare the raw bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_round_trip_every_dtype_is_bit_exact(tmp_path, codec):
    tensors = _sample_tensors()
    write_store(tmp_path / "s", tensors, codec=codec)
    with TensorStore.open(tmp_path / "s") as store:
        assert sorted(store) == sorted(tensors)
        for name, tensor in tensors.items():
            assert _bits_equal(store[name], tensor), name
            assert store.info(name)["codec"] == codec


def test_per_tensor_codec_choice(tmp_path):
    tensors = {"a": torch.zeros(1000), "b": torch.ones(1000)}
    write_store(tmp_path / "s", tensors, codec={"a": "zstd"})
    with TensorStore.open(tmp_path / "s") as store:
        assert store.info("a")["codec"] == "zstd"
        assert store.info("a")["stored_nbytes"] < 4000
        assert store.info("b")["codec"] == "none"


def test_uncompressed_tensors_are_zero_copy_views_of_the_mapping(tmp_path):
    write_store(tmp_path / "s", {"w": torch.arange(4096, dtype=torch.float32)})
    with TensorStore.open(tmp_path / "s") as store:
        first, second = store["w"], store["w"]
        # Both reads return the same bytes: the mapping, not two copies.
        assert first.data_ptr() == second.data_ptr()
        assert first.data_ptr() % 64 == 0
        maps = Path("/proc/self/maps").read_text().splitlines()
        shard = [line for line in maps if "shard" in line and str(tmp_path) in line]
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in shard]
        assert any(lo <= first.data_ptr() < hi for lo, hi in ranges)


def test_tensor_outlives_close_of_its_store(tmp_path):
    write_store(tmp_path / "s", {"w": torch.arange(1000, dtype=torch.int64)})
    store = TensorStore.open(tmp_path / "s")
    tensor = store["w"]
    store.close()
    del store
    gc.collect()
    assert torch.equal(tensor, torch.arange(1000, dtype=torch.int64))


def test_writing_into_a_view_never_changes_the_file(tmp_path):
    write_store(tmp_path / "s", {"w": torch.zeros(100)})
    with TensorStore.open(tmp_path / "s") as store:
        store["w"].add_(1.0)
    with TensorStore.open(tmp_path / "s") as store:
        assert torch.equal(store["w"], torch.zeros(100))


def test_every_shard_is_a_valid_safetensors_file(tmp_path):
    tensors = {k: v for k, v in _sample_tensors().items()}
    write_store(tmp_path / "s", tensors, shard_size=100)
    shards = sorted((tmp_path / "s").glob("*.safetensors"))
    assert len(shards) > 1
    seen = {}
    for shard in shards:
        with safetensors.safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if not key.startswith("__bigmodel_pad_"):
                    seen[key] = f.get_tensor(key)
    assert sorted(seen) == sorted(tensors)
    for name, tensor in tensors.items():
        assert _bits_equal(seen[name], tensor.contiguous()), name


def test_every_zstd_tensor_is_a_standard_frame(tmp_path):
    tensors = _sample_tensors()
    write_store(tmp_path / "s", tensors, codec="zstd")
    index = json.loads((tmp_path / "s" / _core.INDEX_FILE).read_text())
    decoder = zstandard.ZstdDecompressor()
    for entry in index["tensors"]:
        if entry["raw_length"] == 0:
            continue
        blob = (tmp_path / "s" / index["files"][entry["file"]]["path"]).read_bytes()
        frame = blob[entry["offset"] : entry["offset"] + entry["length"]]
        raw = decoder.decompress(frame)
        assert (
            raw == tensors[entry["name"]].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )


def test_mount_serves_safetensors_files_in_place(tmp_path):
    tensors = {f"layer.{i}": _random(torch.float16, (33, 7), seed=i) for i in range(5)}
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, file)
    reference = safetensors.torch.load_file(file)
    with TensorStore.mount([file]) as store:
        for name in tensors:
            assert _bits_equal(store[name], reference[name])
        assert store.files()[0]["mounted"]


def test_lazy_views_after_will_need_hold_the_file_bytes(tmp_path):
    tensors = {f"layer.{i}": _random(torch.float32, (256, 64), seed=i) for i in range(4)}
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, file)
    reference = safetensors.torch.load_file(file)
    with TensorStore.mount([file], max_resident=0, populate_views=False) as store:
        store.will_need(tensors)
        store.populate_in_background(tensors)
        assert store.stats()["bytes_read"] == 0
        for name in tensors:
            assert _bits_equal(store[name], reference[name])
        for advise in (store.will_need, store.populate_in_background):
            with pytest.raises(TensorNotFoundError, match="nope"):
                advise(["layer.0", "nope"])


def test_write_mount_commits_an_index_only(tmp_path):
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(10)}
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, file)
    write_mount(tmp_path / "offload", [file])
    written = sum(p.stat().st_size for p in (tmp_path / "offload").iterdir())
    assert written < 4096  # the index only
    with TensorStore.open(tmp_path / "offload") as store:
        assert torch.equal(store["a"], tensors["a"])


def test_accelerate_offload_folder_is_mounted(tmp_path):
    from accelerate.utils import offload_state_dict

    tensors = {"w": torch.randn(8, 8), "b": torch.randn(8).to(torch.bfloat16), "n": torch.tensor(7)}
    offload_state_dict(tmp_path, tensors)
    with TensorStore.mount(tmp_path) as store:
        for name, tensor in tensors.items():
            assert _bits_equal(store[name], tensor), name


def test_resident_bytes_stay_within_budget_plus_pinned(tmp_path):
    tensors = {f"w{i}": torch.full((256, 256), float(i)) for i in range(16)}  # 256 KiB each
    write_store(tmp_path / "s", tensors)
    budget = 1 << 20
    with TensorStore.open(tmp_path / "s", max_resident=budget) as store:
        held = []
        for i, name in enumerate(tensors):
            tensor = store[name]
            assert tensor[0, 0].item() == float(i)
            if i % 5 == 0:
                held.append(tensor)  # stays pinned
            stats = store.stats()
            assert stats["charged_bytes"] <= budget + stats["pinned_bytes"]
        assert store.stats()["evictions"] > 0


def test_prefetch_then_get_counts_as_a_prefetch_hit(tmp_path):
    write_store(tmp_path / "s", {"a": torch.randn(1000), "b": torch.randn(1000)})
    with TensorStore.open(tmp_path / "s") as store:
        store.prefetch(["a"])
        # Once a read thread has started the read (a get before that reads "a" itself).
        deadline = time.monotonic() + 30
        while store.stats()["bytes_read"] < 4000:
            assert time.monotonic() < deadline, "the prefetch never ran"
            time.sleep(0.001)
        store["a"]
        stats = store.stats()
        assert (stats["prefetch_hits"], stats["hits"], stats["misses"]) == (1, 1, 0)


def test_missing_tensor_is_a_key_error_naming_it(tmp_path):
    write_store(tmp_path / "s", {"a": torch.zeros(1)})
    with TensorStore.open(tmp_path / "s") as store:
        with pytest.raises(TensorNotFoundError, match="'nope'") as caught:
            store["nope"]
        assert isinstance(caught.value, KeyError)
        with pytest.raises(TensorNotFoundError):
            store.prefetch(["a", "nope"])


def test_directory_without_index_is_incomplete_or_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bigmodel store"):
        TensorStore.open(tmp_path)
    # What a writer killed before its commit leaves: a temporary shard of its generation.
    (tmp_path / ".tmp-0123456789abcdef-shard-00000.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(IncompleteStoreError):
        TensorStore.open(tmp_path)


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(OSError):
        TensorStore.open(tmp_path / "nothing")


def test_meta_tensors_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="'w'.*meta"):
        write_store(tmp_path / "s", {"w": torch.empty(3, device="meta")})


def test_rewriting_a_store_replaces_it_atomically(tmp_path):
    write_store(tmp_path / "s", {"a": torch.zeros(10)})
    write_store(tmp_path / "s", {"b": torch.ones(10)})
    with TensorStore.open(tmp_path / "s") as store:
        assert list(store) == ["b"]
    leftovers = [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_a_store_is_a_lazy_source_for_another_store(tmp_path):
    tensors = _sample_tensors()
    write_store(tmp_path / "a", tensors)
    with TensorStore.open(tmp_path / "a") as source:
        write_store(tmp_path / "b", source, codec="zstd")
    with TensorStore.open(tmp_path / "b") as copy:
        for name, tensor in tensors.items():
            assert _bits_equal(copy[name], tensor)
            assert copy.verify() == []


def test_numpy_view_keeps_the_pin(tmp_path):
    write_store(tmp_path / "s", {"a": torch.arange(10, dtype=torch.float32)})
    with TensorStore.open(tmp_path / "s", max_resident=0) as store:
        view = store["a"]
        stats = store.stats()
        assert stats["pinned_bytes"] == stats["charged_bytes"] >= 40
        del view
        gc.collect()
        assert store.stats()["pinned_bytes"] == 0
        assert np.array_equal(store["a"].numpy(), np.arange(10, dtype=np.float32))


def test_a_single_name_is_one_name_not_its_characters(tmp_path):
    write_store(tmp_path / "store", {"a.name": torch.ones(8), "a": torch.zeros(2)})
    with TensorStore.open(tmp_path / "store", populate_views=False) as store:
        store.prefetch("a.name")
        store.will_need("a.name")
        store.populate_in_background("a.name")
        assert store.stats()["prefetch_requests"] == 1
        assert torch.equal(store["a.name"], torch.ones(8))
