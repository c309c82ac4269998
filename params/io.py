"""Safetensors files and the HF-name <-> param-tree mapping, with strict checks.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header
length N, N bytes of JSON header `{name: {dtype, shape, data_offsets}, "__metadata__": {}}`,
then the raw little-endian tensor bytes. The `safetensors` library validates the header
(offsets, sizes, overlaps); tensors are then memory-mapped with numpy so that a checkpoint
is read lazily and bfloat16 works (numpy learns bfloat16 from `ml_dtypes`, a jax dependency).

PyTorch checkpoints (`pytorch_model.bin`, or shards + `pytorch_model.bin.index.json`) are
read only with torch installed and only with `torch.load(weights_only=True)`: torch's
restricted unpickler, which builds tensors and plain containers and refuses any other
class, so a `.bin` file can never run code. Safetensors are preferred when both exist, as
in `from_pretrained`.

Everything written goes to a temporary file in the target directory first and is renamed
into place, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import pickle
import tempfile
import zipfile
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
# What `from_pretrained` looks for, in its order of preference: (file, is it an index).
WEIGHT_FILES = ((SINGLE_FILE, False), (INDEX_FILE, True), (BIN_FILE, False), (BIN_INDEX_FILE, True))
TORCH_PIP = "pip install 'refjax[torch]'"


class CheckpointError(ValueError):
    """A checkpoint file or tensor refjax cannot use; the message names the file or key."""


class TorchNotInstalledError(ImportError):
    """A `.bin` checkpoint met without torch installed; the message has the pip command."""


# --------------------------------------------------------------------------------------
# Writing atomically
# --------------------------------------------------------------------------------------


def _umask() -> int:
    umask = os.umask(0)  # the only portable way to read the umask is to set it (and restore it)
    os.umask(umask)
    return umask


def file_mode(path: str) -> int:
    """The permission bits a plain `open(path, "w")` gives: an existing file keeps its mode,
    a new one gets 0o666 minus the process umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def dir_mode() -> int:
    """The permission bits `os.mkdir` gives a new directory: 0o777 minus the umask."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; rename it onto `path` only if the block succeeds.
    The file gets the mode a plain write would give it (`file_mode`), not mkstemp's 0600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, file_mode(path))  # mkstemp makes 0600; give the mode open(path, "w") would
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------
# Safetensors files
# --------------------------------------------------------------------------------------


class LazyTensor:
    """A tensor still on disk: shape and dtype now, bytes only when `np.asarray` asks.

    Reading copies into a fresh buffer (no memory map), so a loader that converts one
    tensor at a time holds at most that tensor in host memory beyond the result."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def read_into(self, out: np.ndarray) -> np.ndarray:
        """Read the bytes into `out` (shape and dtype must match): reuse one host buffer."""
        assert out.shape == self.shape and out.dtype == self.dtype and out.flags.c_contiguous
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            view = memoryview(out.reshape(-1).view(np.uint8))
            if f.readinto(view) != self.nbytes:
                raise CheckpointError(f"{self.path}: file ends inside a tensor")
        return out

    def __array__(self, dtype=None, copy=None):
        array = self.read_into(np.empty(self.shape, self.dtype))
        return array if dtype is None else array.astype(dtype)

    def read_slice(self, index: tuple) -> np.ndarray:
        """Only the entries at `index` (a tuple of slices), copied into a fresh buffer: the
        file is memory-mapped for the copy, so the OS reads the pages that hold them (a
        device of a mesh reads its shard, not the whole tensor)."""
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        try:
            return np.array(mapped[index])
        finally:
            del mapped


def read_safetensors(path: str | os.PathLike, lazy: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """All tensors of one safetensors file and its metadata: memory-mapped read-only arrays,
    or `LazyTensor`s (read on demand into fresh buffers) with `lazy=True`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {path!r} does not exist")
    size = os.path.getsize(path)
    try:  # the library's validation of header, offsets and file size
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if lazy:
            tensors[name] = LazyTensor(path, data_start + begin, shape, dtype)
        elif end - begin == 0:
            tensors[name] = np.zeros(shape, dtype)
        else:
            tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
    assert data_start <= size
    return tensors, dict(metadata)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy or jax arrays, any dtype in DTYPES) atomically, in sorted key order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data to 8 bytes
    with atomic_write(path) as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for array in arrays:
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one PyTorch `.bin` state dict as numpy arrays (memory-mapped for the
    zip format torch has written since 1.6), read with `torch.load(weights_only=True)`.

    Raises TorchNotInstalledError (an ImportError naming the pip command) without torch, and
    CheckpointError when the pickle holds anything but tensors (refused, never unpickled)
    or is not a readable torch file."""
    path = os.fspath(path)
    try:
        import torch
    except ImportError:
        raise TorchNotInstalledError(
            f"{path}: reading PyTorch .bin checkpoints needs torch, which is not installed: {TORCH_PIP} "
            "(or convert the checkpoint to safetensors where torch is installed: refjax convert DIR OUT)") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist")
    try:  # mmap needs the zip format; the legacy format is read whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (UnpicklingError: {text})") from None
        # torch's reason, e.g. "Unsupported global: GLOBAL pkg.Class was not an allowed global by default"
        why = " ".join(text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].split())
        why = why.partition(". Please use")[0] or "objects other than tensors"
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True), which reads only tensors and plain containers: "
            f"{why}. refjax never runs a full unpickle (it can execute code)") from None
    except Exception as e:  # torch reports a truncated or foreign file as RuntimeError, KeyError, EOFError, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (tensor name -> tensor), got {type(state).__name__}")
    tensors = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensors[name] = _torch_to_numpy(path, name, tensor, torch)
    return tensors


def _torch_to_numpy(path: str, name: str, tensor: Any, torch: Any) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory; bfloat16 through ml_dtypes."""
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        array = tensor.detach().numpy()
    except TypeError:
        array = None
    if array is None or array.dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which refjax does not read")
    return array


def read_checkpoint_tensors(checkpoint_dir: str | os.PathLike, lazy: bool = False) -> dict[str, Any]:
    """Every tensor of a HF checkpoint dir: `model.safetensors` or a sharded index
    (memory-mapped arrays, or `LazyTensor`s with `lazy=True`), else `pytorch_model.bin` or
    its sharded index (with torch: `read_torch_bin`)."""
    return {name: tensor for _, _, tensors in iter_checkpoint_shards(checkpoint_dir, lazy)
            for name, tensor in tensors.items()}


def weight_files(checkpoint_dir: str | os.PathLike) -> tuple[str, list[str]]:
    """(the file found first in WEIGHT_FILES' order, the weight files it stands for: itself,
    or the shards its index names, in sorted order). Checks the index and that each shard exists."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    found = [(name, is_index) for name, is_index in WEIGHT_FILES if os.path.isfile(os.path.join(checkpoint_dir, name))]
    if not found:
        names = [name for name, _ in WEIGHT_FILES]
        raise FileNotFoundError(f"no {', '.join(names[:-1])} or {names[-1]} in {checkpoint_dir!r}")
    name, is_index = found[0]
    if not is_index:
        return name, [name]
    index = os.path.join(checkpoint_dir, name)
    shards = sorted(set(_read_weight_map(index).values()))
    for shard in shards:
        if os.path.dirname(shard) or not os.path.isfile(os.path.join(checkpoint_dir, shard)):
            raise FileNotFoundError(f"{index} names shard {shard!r}, which is not a file in {checkpoint_dir!r}")
    return name, shards


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' must map tensor names to file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: invalid sharded index ({type(e).__name__}: {e})") from None
    return weight_map


def iter_checkpoint_shards(checkpoint_dir: str | os.PathLike,
                           lazy: bool = False) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(shard number from 1, file name, its tensors) for each weight file of a checkpoint dir,
    in `weight_files` order; with an index, every tensor checked against its weight map."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    name, shards = weight_files(checkpoint_dir)
    torch_format = name in (BIN_FILE, BIN_INDEX_FILE)
    weight_map = _read_weight_map(os.path.join(checkpoint_dir, name)) if shards != [name] else None
    seen: set[str] = set()
    for n, shard in enumerate(shards, 1):
        path = os.path.join(checkpoint_dir, shard)
        tensors = read_torch_bin(path) if torch_format else read_safetensors(path, lazy)[0]
        if weight_map is not None:
            for key in tensors:
                if weight_map.get(key) != shard:
                    raise CheckpointError(f"{os.path.join(checkpoint_dir, name)}: tensor {key!r} is stored in "
                                          f"{shard!r} but the index maps it to {weight_map.get(key)!r}")
        seen.update(tensors)
        yield n, shard, tensors
    missing = sorted(set(weight_map or ()) - seen)
    if missing:
        raise CheckpointError(f"{os.path.join(checkpoint_dir, name)}: tensor {missing[0]!r} is mapped to "
                              f"{weight_map[missing[0]]!r}, which does not contain it ({len(missing)} such tensor(s))")


def write_checkpoint_tensors(checkpoint_dir: str | os.PathLike, tensors: Mapping[str, Any],
                             max_shard_bytes: int | None = None) -> list[str]:
    """Write tensors as HF does: one `model.safetensors`, or shards + index when larger than
    `max_shard_bytes`. Returns the file names written."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    metadata = {"format": "pt"}  # what HF's save_pretrained writes; from_pretrained expects it
    sizes = {k: np.asarray(v).nbytes for k, v in tensors.items()}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        write_safetensors(os.path.join(checkpoint_dir, SINGLE_FILE), tensors, metadata)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in sorted(tensors):
        if shards[-1] and shard_bytes + sizes[name] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += sizes[name]
    files, weight_map = [], {}
    for n, names in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(checkpoint_dir, file), {k: tensors[k] for k in names}, metadata)
        weight_map.update({k: file for k in names})
        files.append(file)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    with atomic_write(os.path.join(checkpoint_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return files + [INDEX_FILE]


# --------------------------------------------------------------------------------------
# HF names <-> param tree
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NameRule:
    """One leaf of a param tree and the HF tensor(s) it holds.

    `path` is the dotted attribute path in the tree (`transformer.h.attn.c_attn.kernel`).
    `hf` is the HF key; a `{i}` in it marks a per-layer tensor stacked on axis 0 here.
    `transpose` swaps the last two axes (HF `nn.Linear` [out, in] -> our kernel [in, out]).
    """

    path: str
    hf: str
    transpose: bool = False


def tree_paths(tree: Any) -> list[tuple[str, Any]]:
    """(dotted path, leaf) for every leaf of a pytree of eqx.Modules."""
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((".".join(str(getattr(k, "name", getattr(k, "key", k))) for k in keypath), leaf))
    return out


def _hf_shape(shape: tuple[int, ...], rule: NameRule) -> tuple[int, ...]:
    return shape[:-2] + (shape[-1], shape[-2]) if rule.transpose else shape


def tree_from_tensors(tensors: Mapping[str, np.ndarray], skeleton: Any, rules: list[NameRule],
                      dropped: Mapping[str, str], base_prefix: str = "", dtype: Any = None,
                      shardings: Any = None) -> Any:
    """Fill `skeleton` (a tree of ShapeDtypeStructs) from HF-named tensors.

    Strict: every leaf must be found with the right shape, a floating dtype and finite
    values, and every tensor must be used exactly once or match a `dropped` pattern (key regex -> reason).
    `base_prefix`: if no key carries it (HF's bare-body checkpoints), it is added to every
    key that no rule names without it, as HF's `from_pretrained` does.
    `dtype`: cast leaves to it; None keeps the checkpoint dtype.
    `shardings`: a tree of `jax.sharding.Sharding`s (same structure): each leaf is then
    placed straight from the file, each device reading only its shard (`sharded_leaf`).
    """
    tensors = dict(tensors)
    if base_prefix and tensors and not any(k.startswith(base_prefix) for k in tensors):
        unprefixed = {r.hf for r in rules if not r.hf.startswith(base_prefix)}
        tensors = {(k if k in unprefixed else base_prefix + k): v for k, v in tensors.items()}
    by_path = {r.path: r for r in rules}
    used: set[str] = set()
    leaves = []
    sharding_leaves = None if shardings is None else jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

    def to_device(part, rule, key):  # one tensor: read into a fresh host buffer, check, transpose, move, cast
        # A fresh buffer each time: device_put may alias host memory while dispatch is
        # asynchronous, so a reused scratch buffer would be overwritten under it.
        array = np.asarray(part)
        bad = _count_nonfinite(array)
        if bad:  # a NaN/inf weight only ever gives NaN outputs: refuse it here, naming it
            raise CheckpointError(f"tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)")
        array = np.swapaxes(array, -1, -2) if rule.transpose else array
        return jax.device_put(array).astype(dtype or array.dtype)

    for path, spec in tree_paths(skeleton):
        rule = by_path[path]
        keys = [rule.hf.format(i=i) for i in range(spec.shape[0])] if "{i}" in rule.hf else [rule.hf]
        per_key_shape = _hf_shape(spec.shape[1:] if "{i}" in rule.hf else spec.shape, rule)
        parts = []
        for key in keys:
            if key not in tensors:
                raise CheckpointError(f"missing tensor {key!r} (expected shape {list(per_key_shape)})")
            array = tensors[key]
            if tuple(array.shape) != per_key_shape:
                raise CheckpointError(f"tensor {key!r} has shape {list(array.shape)}; expected {list(per_key_shape)}")
            if not jax.numpy.issubdtype(array.dtype, jax.numpy.floating):  # numpy alone misses bfloat16
                raise CheckpointError(f"tensor {key!r} has dtype {array.dtype}; expected a floating dtype")
            used.add(key)
            parts.append(array)
        if shardings is not None:
            leaf = sharded_leaf(parts, keys, rule, tuple(spec.shape), dtype, sharding_leaves[len(leaves)])
        elif "{i}" in rule.hf:  # fill the [L, ...] stack layer by layer, in place: no second copy of the group
            leaf_dtype = dtype or parts[0].dtype
            leaf = jax.numpy.zeros((len(parts),) + _hf_shape(per_key_shape, rule), leaf_dtype)
            for i, (key, part) in enumerate(zip(keys, parts)):
                leaf = _set_layer(leaf, to_device(part, rule, key), np.int32(i))
        else:
            leaf = to_device(parts[0], rule, keys[0])
        leaves.append(leaf)
    for key in sorted(set(tensors) - used):
        if not any(re.fullmatch(pattern, key) for pattern in dropped):
            raise CheckpointError(f"unexpected tensor {key!r} (shape {list(tensors[key].shape)}) in checkpoint")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(skeleton), leaves)


def _read_part(part: Any, index: tuple) -> np.ndarray:
    """`part[index]` as a fresh host array, reading only those entries of a lazy tensor."""
    if hasattr(part, "read_slice"):
        return part.read_slice(index)
    return np.array(np.asarray(part)[index])


def sharded_leaf(parts: list, keys: list[str], rule: NameRule, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """One leaf placed on a mesh straight from the checkpoint: each addressable device's
    callback reads only its slice of the HF tensor(s) (through the transpose, per layer of a
    stack), checks it and casts it; nothing else of the tensor is read in this process, and
    a slice several of its devices hold is read once."""
    stacked = "{i}" in rule.hf
    # JAX calls back once per addressable device; devices holding the same slice (replicas
    # along another mesh axis) get the one read, so each distinct slice is read once here.
    read: dict[tuple, np.ndarray] = {}

    def shard(index: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = tuple(sl.indices(n) for sl, n in zip(index, shape))
        if key not in read:
            read[key] = read_shard(index)
        return read[key]

    def read_shard(index: tuple) -> np.ndarray:
        layers = range(*index[0].indices(shape[0])) if stacked else [None]
        inner = index[1:] if stacked else index
        hf_index = inner[:-2] + (inner[-1], inner[-2]) if rule.transpose else inner
        pieces = []
        for layer in layers:
            part, key = (parts[layer], keys[layer]) if stacked else (parts[0], keys[0])
            array = _read_part(part, hf_index)
            bad = _count_nonfinite(array)
            if bad:
                raise CheckpointError(f"tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)")
            pieces.append(np.swapaxes(array, -1, -2) if rule.transpose else array)
        block = np.stack(pieces) if stacked else pieces[0]
        return block.astype(dtype or block.dtype)

    return jax.make_array_from_callback(shape, sharding, shard)


def _count_nonfinite(array: np.ndarray, chunk: int = 1 << 20) -> int:
    """NaN/inf entries, counted a chunk at a time so no full-size mask is allocated."""
    flat = array.reshape(-1)
    return sum(int(chunk_len - np.count_nonzero(np.isfinite(flat[i:i + chunk])))
               for i in range(0, flat.size, chunk) for chunk_len in [min(chunk, flat.size - i)])


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, index) -> jax.Array:
    """stack[index] = layer, reusing stack's buffer (donated)."""
    return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), index, 0)


def tensors_from_tree(tree: Any, rules: list[NameRule]) -> dict[str, np.ndarray]:
    """The HF-named tensors of a param tree: the inverse of `tree_from_tensors`."""
    by_path = {r.path: r for r in rules}
    out = {}
    for path, leaf in tree_paths(tree):
        rule = by_path[path]
        array = np.asarray(leaf)
        if rule.transpose:
            array = np.swapaxes(array, -1, -2)
        if "{i}" in rule.hf:
            for i in range(array.shape[0]):
                out[rule.hf.format(i=i)] = np.asarray(array[i], order="C")
        else:
            out[rule.hf] = np.asarray(array, order="C")
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs (nothing is allocated)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
