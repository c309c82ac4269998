"""Tensor dumps on disk: read and write them by extension, and make one from a refjax forward.

A dump is a set of named tensors: the outputs and taps of one forward pass (what
`refjax diff` compares) and the inputs that produced them (so another implementation can
rebuild the same call, and so the diff knows which positions are padding). Formats, chosen
by the path's extension:

  .safetensors   refjax's own format; metadata "order" (a JSON list of the names in model
                 order, since safetensors sorts its keys) and "producer", "dtype", ...
  .npz           numpy's archive (`np.savez`): what numpy, JAX and many C++ tools write.
                 refjax writes its metadata as a JSON string in an entry `__metadata__`;
                 bfloat16 is written as float32 (numpy stores it as raw bytes otherwise).
  .npy           one array, named after the file (`logits.npy` -> "logits"); read only.
  a folder       every `NAME.npy` in it (`h.0.attn.q.npy` -> "h.0.attn.q"), and the order
                 from an `order.json` list when the folder has one; read only.

Anything else is refused with the accepted list, never guessed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

from refjax.params import io

# The inputs of a forward a dump may carry (`refjax forward --inputs` reads the same names).
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "mc_token_ids", "labels",
              "mc_labels", "start_positions", "end_positions")
READ_FORMATS = (".safetensors", ".npz", ".npy", "a folder of .npy files")
WRITE_FORMATS = (".safetensors", ".npz")
NPZ_METADATA = "__metadata__"


@dataclasses.dataclass(frozen=True)
class Dump:
    path: str
    tensors: dict[str, Any]  # name -> numpy array (memory-mapped for safetensors)
    order: list[str] | None  # the "order" metadata, when the file has it
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def inputs(self) -> dict[str, Any]:
        return {k: self.tensors[k] for k in INPUT_KEYS if k in self.tensors}


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _refuse(path: str, formats: Sequence[str], what: str) -> ValueError:
    suffix = _suffix(path) or "(none)"
    return ValueError(f"{path}: unknown {what} format {suffix!r}; accepted: {', '.join(formats)}")


def check_writable(path: str) -> None:
    """Refuse, before any compute, an output path whose extension refjax cannot write."""
    if _suffix(path) == ".npy":
        raise ValueError(f"{path}: a .npy file holds one array and a dump holds many; use .safetensors or .npz")
    if _suffix(path) not in WRITE_FORMATS:
        raise _refuse(path, WRITE_FORMATS, "output")


def _order(path: str, raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    try:
        order = json.loads(raw)
    except json.JSONDecodeError:
        order = None
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise ValueError(f"{path}: metadata 'order' must be a JSON list of tensor names")
    return order


def _read_npz(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            tensors = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a valid .npz file ({e})") from None
    metadata = {}
    if NPZ_METADATA in tensors:
        try:
            metadata = json.loads(str(tensors.pop(NPZ_METADATA)))
        except json.JSONDecodeError:
            metadata = None
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: entry {NPZ_METADATA!r} must be a JSON object of strings")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a valid .npy file ({e})") from None


def _read_folder(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".npy"))
    if not names:
        raise ValueError(f"{path}: a folder dump must hold NAME.npy files; found none")
    tensors = {n[:-len(".npy")]: _read_npy(os.path.join(path, n)) for n in names}
    order_file = os.path.join(path, "order.json")
    metadata = {}
    if os.path.isfile(order_file):
        with open(order_file, encoding="utf-8") as f:
            metadata["order"] = f.read()
    return tensors, metadata


def read_dump(path: str | os.PathLike) -> Dump:
    """A dump and its metadata, by extension (see the module docstring). Missing path:
    FileNotFoundError; an unknown extension, a file that is not what its extension says,
    or an "order" that is not a JSON list of names: ValueError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        tensors, metadata = _read_folder(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"dump {path!r} does not exist")
    elif _suffix(path) == ".safetensors":
        tensors, metadata = io.read_safetensors(path)
    elif _suffix(path) == ".npz":
        tensors, metadata = _read_npz(path)
    elif _suffix(path) == ".npy":
        tensors, metadata = {os.path.basename(path)[:-len(".npy")]: _read_npy(path)}, {}
    else:
        raise _refuse(path, READ_FORMATS, "dump")
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype.kind not in "biuf" and dtype.name != "bfloat16":  # strings, objects, raw bytes
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, not a number")
    return Dump(path, dict(tensors), _order(path, metadata.get("order")), dict(metadata))


def write_dump(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write atomically (temporary file, renamed into place) as the extension says."""
    path = os.fspath(path)
    check_writable(path)
    if _suffix(path) == ".safetensors":
        io.write_safetensors(path, tensors, metadata)
        return
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        arrays[name] = array.astype(np.float32) if array.dtype.name == "bfloat16" else array
    arrays[NPZ_METADATA] = np.array(json.dumps(dict(metadata)))
    with io.atomic_write(path) as f:
        np.savez(f, **arrays)


def forward_dump(family: str, out, inputs: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A forward's Output -> (HF-named numpy arrays, their model order): the inputs given,
    the output fields, `hidden_states.{i}`, `attentions.{i}` and, when the forward ran with
    taps, every tap as `ref/<family>.py: TAPS` names it (`h.{i}.attn.q`). The order
    (diff.model_order) is what `refjax diff` compares in; it goes into the file's metadata."""
    from refjax.tooling import diff
    from refjax.tooling.families import FAMILIES

    tensors: dict[str, Any] = {k: np.asarray(v) for k, v in (inputs or {}).items()}
    for field in diff.OUTPUT_FIELDS:
        value = getattr(out, field)
        if value is not None:
            tensors[field] = np.asarray(value)
    for i, hidden in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = np.asarray(hidden)
    for i, probs in enumerate(out.attentions):
        tensors[f"attentions.{i}"] = np.asarray(probs)
    spec = FAMILIES[family].taps
    n_layers = len(out.attentions)
    if out.taps is not None:
        tensors.update(diff.expand_taps(out.taps, spec, n_layers, FAMILIES[family].optional_taps))
    return tensors, diff.model_order(tensors, spec, n_layers)


def read_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The inputs of a forward: an inputs file (only INPUT_KEYS, `input_ids` required,
    integers but for `labels`/`mc_labels`), or a dump (a file with an "order", as `refjax
    forward` and `refjax hf-taps` write), whose inputs are taken and the rest ignored."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"inputs file {path!r} does not exist")
    dump = read_dump(path)
    tensors = dump.inputs if dump.order is not None else dump.tensors
    unknown = sorted(set(tensors) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(f"inputs file {path!r} has unknown tensor(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(INPUT_KEYS)}")
    if "input_ids" not in tensors:
        raise ValueError(f"inputs file {path!r} has no 'input_ids' tensor")
    for name, array in tensors.items():
        if name not in ("labels", "mc_labels") and np.dtype(array.dtype).kind not in "iu":
            raise ValueError(f"inputs file {path!r}: {name!r} must be an integer tensor, got {array.dtype}")
    return {k: np.asarray(v) for k, v in tensors.items()}
