"""A HF checkpoint directory <-> (config, params): the one entry point for loading.

A directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` + shards, as `save_pretrained` writes them (or, read with
torch, `pytorch_model.bin` or its shards; `convert_checkpoint` writes their safetensors
version). A model id ("org/name") already in the local HF cache is read offline
(params/hub.py). The family is chosen by `model_type`, the head by `architectures[0]`, as
HF's Auto classes do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from types import ModuleType
from typing import Any

import jax

import numpy as np

from refjax.params import config as config_lib
from refjax.params import arcee, gpt2, hub
from refjax.params import ibert
from refjax.params import io
from refjax.params import mega
from refjax.params import roformer


@dataclasses.dataclass(frozen=True)
class Family:
    parse_config: Any  # raw dict -> config dataclass
    module: ModuleType  # skeleton, name_rules, dropped_keys, base_prefix


FAMILIES: dict[str, Family] = {
    "gpt2": Family(gpt2.parse_gpt2_config, gpt2),
    "arcee": Family(arcee.parse_arcee_config, arcee),
    "ibert": Family(ibert.parse_ibert_config, ibert),
    "mega": Family(mega.parse_mega_config, mega),
    "roformer": Family(roformer.parse_roformer_config, roformer),
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    family: str
    config: Any  # frozen, hashable: pass as a static argument
    params: Any  # eqx.Module pytree of jax arrays
    raw_config: dict  # config.json as read, written back unchanged by `save_checkpoint`


def family_of(raw: dict) -> str:
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise config_lib.ConfigError(
            f"config field 'model_type' is {model_type!r}; accepted values: {', '.join(map(repr, FAMILIES))}")
    return model_type


def load_config(checkpoint_dir: str | os.PathLike, revision: str | None = None) -> tuple[str, Any, dict]:
    """(family, parsed config, raw dict) of a checkpoint directory or cached model id
    (`hub.resolve`), without reading weights."""
    raw = config_lib.read_config_json(hub.resolve(checkpoint_dir, revision))
    family = family_of(raw)
    return family, FAMILIES[family].parse_config(raw), raw


def load_checkpoint(checkpoint_dir: str | os.PathLike, dtype: Any = None, revision: str | None = None,
                    mesh: Any = None) -> Checkpoint:
    """Load config and weights with strict checks; `dtype` casts floats (None keeps them).

    `checkpoint_dir` is a directory, or a model id ("org/name") already in the local HF cache,
    read offline at `revision` (branch, tag or commit; default "main") as
    `from_pretrained(..., local_files_only=True)` reads it (params/hub.py).
    `mesh` (a `jax.sharding.Mesh` with "data" and "model" axes, params/sharding.py): every
    tensor is placed with its tensor-parallel sharding straight from the file, each device
    (and, under `jax.distributed`, each process) reading only its own slices; no device
    ever holds the whole model unless the mesh says so."""
    checkpoint_dir = hub.resolve(checkpoint_dir, revision)
    family, config, raw = load_config(checkpoint_dir)
    module = FAMILIES[family].module
    tensors = io.read_checkpoint_tensors(checkpoint_dir, lazy=True)
    if hasattr(module, "computed_tensors"):  # tensors HF recomputes or reads elsewhere (RoFormer)
        tensors = {**tensors, **module.computed_tensors(config, tensors)}
    skeleton = module.skeleton(config)
    shardings = None
    if mesh is not None:
        from jax.sharding import NamedSharding

        from refjax.params import sharding

        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), sharding.param_specs(skeleton, mesh),
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = io.tree_from_tensors(
        tensors, skeleton, module.name_rules(config), module.dropped_keys(config),
        base_prefix=module.base_prefix(config), dtype=dtype, shardings=shardings)
    return Checkpoint(family, config, params, raw)


def save_checkpoint(checkpoint_dir: str | os.PathLike, checkpoint: Checkpoint,
                    max_shard_bytes: int | None = None) -> None:
    """Write `config.json` + safetensors in HF's layout, so `from_pretrained` loads it."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    module = FAMILIES[checkpoint.family].module
    tensors = io.tensors_from_tree(checkpoint.params, module.name_rules(checkpoint.config))
    io.write_checkpoint_tensors(checkpoint_dir, tensors, max_shard_bytes)
    with io.atomic_write(os.path.join(checkpoint_dir, "config.json"), "w") as f:
        json.dump(checkpoint.raw_config, f, indent=2, sort_keys=True)
        f.write("\n")


# Files `convert` does not copy: weights in any format (the converted ones replace them).
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".index.json", ".h5", ".msgpack", ".ckpt", ".pt", ".pth", ".onnx")


def convert_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, revision: str | None = None,
                       log: Any = None) -> list[str]:
    """Write the safetensors version of a checkpoint (e.g. `pytorch_model.bin` or its shards)
    to the new directory `out_dir`: one safetensors file per source shard, HF's names and
    index, tensors byte for byte; every other file (config, tokenizer, generation config)
    copied. Atomic: everything is written into a temp directory beside `out_dir` that is
    renamed onto it at the end, so a failed run leaves nothing. `log` (e.g. `print`) gets one
    progress line per shard. Returns the file names written."""
    source = hub.resolve(checkpoint_dir, revision)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise FileExistsError(f"output {out_dir!r} already exists; convert writes a new (or empty) directory")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output folder {parent!r} does not exist")
    config_lib.read_config_json(source)  # a checkpoint directory at all: config.json readable
    first, shards = io.weight_files(source)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
    try:
        os.chmod(staging, io.dir_mode())  # mkdtemp makes 0o700; give the mode os.mkdir would
        names = []
        weight_map, total = {}, 0
        for n, shard, tensors in io.iter_checkpoint_shards(source):
            name = io.SINGLE_FILE if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            io.write_safetensors(os.path.join(staging, name), tensors, {"format": "pt"})
            size = sum(np.asarray(t).nbytes for t in tensors.values())
            weight_map.update({k: name for k in tensors})
            total += size
            names.append(name)
            if log:
                log(f"[{n}/{len(shards)}] {shard} -> {name}: {len(tensors)} tensors, {size / 1e6:.1f} MB")
        if len(shards) > 1:
            with io.atomic_write(os.path.join(staging, io.INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
            names.append(io.INDEX_FILE)
        for name in sorted(os.listdir(source)):
            if os.path.isfile(os.path.join(source, name)) and not name.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))  # follows cache symlinks
                names.append(name)
        if log:
            log(f"copied {', '.join(n for n in names if not n.endswith(_WEIGHT_SUFFIXES))}")
        os.replace(staging, out_dir)  # an empty out_dir is replaced; one that gained files meanwhile fails
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return names

