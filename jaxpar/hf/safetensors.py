"""A safetensors reader that never loads a whole file: the header is parsed and checked, tensors are
memory-mapped views, and only the slices a device needs are ever read. Never unpickles anything."""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxpar.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class SafeTensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2 ** 20:
                raise CheckpointError(f"{path}: corrupted safetensors header (header length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupted safetensors header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                kind, shape, (lo, hi) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupted safetensors header entry for {name}") from None
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, lo, hi)):
                raise CheckpointError(f"{path}: corrupted safetensors header entry for {name} "
                                      f"(shape {e['shape']}, offsets {e['data_offsets']})")
            if kind not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {kind}, which jaxpar does not read")
            dtype = DTYPES[kind]
            need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if hi - lo != need or lo < 0:
                raise CheckpointError(f"{path}: tensor {name} has {hi - lo} bytes but shape {list(shape)} "
                                      f"{e['dtype']} needs {need}")
            if self.base + hi > size:
                raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {self.base + hi}, "
                                      f"the file has {size}")
            self.entries[name] = (dtype, shape, lo)
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self.base else np.zeros(0, np.uint8)

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def array(self, name: str) -> np.ndarray:
        """A lazy, read-only view: nothing is read until it is sliced."""
        dtype, shape, lo = self.entries[name]
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self._mm[self.base + lo:self.base + lo + n].view(dtype).reshape(shape)


class WeightFiles:
    """All safetensors files of a model directory (one file, or shards listed in model.safetensors.index.json)."""

    def __init__(self, directory: str):
        self.directory = directory
        names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        index = os.path.join(directory, "model.safetensors.index.json")
        if not names:
            pickled = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickled:
                raise CheckpointError(f"{directory}: only pickled weights ({', '.join(pickled[:3])}); jaxpar never "
                                      f"unpickles: convert them to safetensors first")
            raise CheckpointError(f"{directory}: no *.safetensors weight files")
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            files = sorted(set(weight_map.values()))
            outside = [fn for fn in files if os.path.basename(fn) != fn]
            if outside:
                raise CheckpointError(f"{index}: weight file {outside[0]!r} is not inside the model directory")
            missing = [fn for fn in files if not os.path.isfile(os.path.join(directory, fn))]
            if missing:
                raise CheckpointError(f"{index}: lists missing weight file(s) {', '.join(missing[:3])}")
        else:
            files = names
        self.files = {fn: SafeTensorsFile(os.path.join(directory, fn)) for fn in files}
        self.where = {}
        for fn, st in self.files.items():
            for name in st.entries:
                self.where[name] = st

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple:
        return self.where[name].shape(name)

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(name)
