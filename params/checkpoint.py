"""A HF checkpoint directory <-> (config, params): the one entry point for loading.

A directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` + shards, as `save_pretrained` writes them. The family is
chosen by `model_type`, the head by `architectures[0]`, as HF's Auto classes do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import ModuleType
from typing import Any

from refjax.params import config as config_lib
from refjax.params import arcee, gpt2
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


def load_config(checkpoint_dir: str | os.PathLike) -> tuple[str, Any, dict]:
    """(family, parsed config, raw dict) of a checkpoint directory, without reading weights."""
    raw = config_lib.read_config_json(checkpoint_dir)
    family = family_of(raw)
    return family, FAMILIES[family].parse_config(raw), raw


def load_checkpoint(checkpoint_dir: str | os.PathLike, dtype: Any = None) -> Checkpoint:
    """Load config and weights with strict checks; `dtype` casts floats (None keeps them)."""
    family, config, raw = load_config(checkpoint_dir)
    module = FAMILIES[family].module
    tensors = io.read_checkpoint_tensors(checkpoint_dir, lazy=True)
    if hasattr(module, "computed_tensors"):  # buffers HF recomputes when a checkpoint lacks them (RoFormer)
        tensors = {**tensors, **module.computed_tensors(config, tensors.keys())}
    params = io.tree_from_tensors(
        tensors, module.skeleton(config), module.name_rules(config), module.dropped_keys(config),
        base_prefix=module.base_prefix(config), dtype=dtype)
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
