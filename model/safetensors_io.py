"""Safetensors files, read and written by hand: sharded, one tensor in memory at a time, checked on open.

    weight_map = write_sharded([(name, shape), ...], read_tensor, out_dir, dtype="bfloat16", max_shard_bytes=2**30)
    tensors = SafetensorsDir("hf/llama")        # a Mapping name -> float32 array, read lazily
    tensors.shape("model.norm.weight")

The format (huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the
tensors' bytes back to back. Writing it here (rather than through `safetensors.numpy`)
lets a shard be streamed tensor by tensor, so exporting never holds a shard, let alone the
model, twice; reading through `np.memmap` touches only the tensors asked for.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


class SafetensorsError(ValueError):
    """A safetensors file or index is missing, damaged or disagrees with itself; the message names it."""


def shard_name(index: int, count: int) -> str:
    """`model-00001-of-00003.safetensors` for index 0 of 3 (HF's naming)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int) -> list[list]:
    """Entries split in order into shards of at most `max_shard_bytes` each (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape)))
        size += nbytes
    return shards


def write_sharded(entries: list[tuple[str, tuple[int, ...]]], read: Callable[[str], np.ndarray],
                  out_dir: Path | None, *, dtype: str = "float32", max_shard_bytes: int = 2**31,
                  metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Writes `entries` (name, shape) as `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.

    `read(name)` gives each tensor when its turn comes (cast here to `dtype`); it is called
    for every entry even when `out_dir` is None, so processes that gather shards of a
    tensor together can all run this while only one writes. Returns the weight map.
    """
    itemsize = DTYPES[CODES[dtype]].itemsize
    shards = plan_shards(entries, itemsize, max_shard_bytes)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards):
        name = shard_name(index, len(shards))
        write_file(out_dir / name if out_dir is not None else None, shard, read, dtype=dtype, metadata=metadata)
        weight_map |= {tensor: name for tensor, _ in shard}
        total += sum(math.prod(shape) for _, shape in shard) * itemsize
    if out_dir is not None:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def write_file(path: Path | None, entries: list[tuple[str, tuple[int, ...]]], read: Callable[[str], np.ndarray], *,
               dtype: str = "float32", metadata: Mapping[str, str] | None = None) -> None:
    """One safetensors file of `entries` (name, shape), streamed: `read(name)` is called as each is written.

    With `path` None nothing is written, but every tensor is still read (see `write_sharded`).
    """
    np_dtype = DTYPES[CODES[dtype]]
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    for tensor, shape in entries:
        nbytes = math.prod(shape) * np_dtype.itemsize
        header[tensor] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors' bytes start 8-aligned
    with open(path, "wb") if path is not None else _Discard() as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for tensor, shape in entries:
            array = np.asarray(np.asarray(read(tensor)).astype(np_dtype), order="C")
            if array.shape != tuple(shape):
                raise SafetensorsError(f"{tensor}: shape {array.shape}, planned {tuple(shape)}")
            file.write(array.tobytes())


class _Discard:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass


def read_header(path: Path) -> tuple[dict, int]:
    """(header {name: {dtype, shape, data_offsets}}, byte offset of the data) of one file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated ({size} bytes): no header")
        length = struct.unpack("<Q", head)[0]
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise SafetensorsError(f"{path}: truncated or not safetensors: header of {length} bytes in a "
                                   f"{size}-byte file")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: the header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsError(f"{path}: tensor {name}: unsupported or malformed entry {entry!r}") from err
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SafetensorsError(f"{path}: tensor {name}: {end - begin} bytes for shape {list(shape)} "
                                   f"{entry['dtype']}")
        if end > data_bytes:
            raise SafetensorsError(f"{path}: truncated: tensor {name} ends at byte {end} of the data, "
                                   f"the file holds {data_bytes}")
    return header, 8 + length


class SafetensorsDir(Mapping):
    """The tensors of a HF directory (sharded with an index, or one model.safetensors), read lazily as float32.

    Opening checks everything that can be checked without reading tensor data: the index is
    JSON, every shard it names exists, every tensor it maps is in that shard's header, and
    no header points past the end of its file.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SafetensorsError(f"{index_path}: not a safetensors index ({err})") from err
        elif single.is_file():
            weight_map = None
        else:
            raise SafetensorsError(f"{self.directory}: no {INDEX_FILE} or {SINGLE_FILE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self._headers: dict[str, tuple[dict, int]] = {}
        for file in files:
            if not (self.directory / file).is_file():
                raise SafetensorsError(f"{index_path}: names shard {file}, which is missing from {self.directory}")
            self._headers[file] = read_header(self.directory / file)
        if weight_map is None:
            weight_map = {name: SINGLE_FILE for name in self._headers[SINGLE_FILE][0]}
        for name, file in weight_map.items():
            if name not in self._headers[file][0]:
                raise SafetensorsError(f"{index_path}: maps tensor {name} to {file}, which does not hold it")
        self._files = weight_map

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        file = self._files[name]
        header, data_start = self._headers[file]
        return self.directory / file, header[name], data_start

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from its header."""
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype code (F32, BF16, ...)."""
        return self._entry(name)[1]["dtype"]

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a float32 array (exact for F32, BF16 and F16)."""
        path, entry, data_start = self._entry(name)
        dtype, (begin, _) = DTYPES[entry["dtype"]], entry["data_offsets"]
        shape = tuple(entry["shape"])
        if not math.prod(shape):
            return np.zeros(shape, np.float32)
        data = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(math.prod(shape),))
        return np.asarray(data, dtype=np.float32).reshape(shape)
