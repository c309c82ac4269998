"""Partition specs for running refjax on a `jax.sharding.Mesh` (data + tensor parallel).

Kept out of the model math (STYLE 11): the forward functions are unchanged; arrays carry
their shardings and XLA's SPMD partitioner inserts the collectives. Tensor parallelism is
Megatron-style: projections that fan out (q/k/v, fused c_attn, MLP up) are split along
their output columns, projections that fan in (attention output, MLP down) along their
input rows, so each layer needs one all-reduce per block. Everything else (norms,
embeddings, heads) is replicated. A leaf whose split dimension does not divide by the
mesh axis stays replicated. Inputs are split along the batch on the data axis.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from refjax.params.io import tree_paths

DATA, MODEL = "data", "model"

# (regex on the dotted tree path, which kernel axis to split: "out" columns or "in" rows).
# Paths are those of the param trees (layers stacked on axis 0, kernels [L, in, out]).
TENSOR_PARALLEL_RULES: list[tuple[str, str]] = [
    (r"transformer\.h\.attn\.c_attn\.(kernel|bias)", "out"),
    (r"transformer\.h\.mlp\.c_fc\.(kernel|bias)", "out"),
    (r"transformer\.h\.attn\.c_proj\.kernel", "in"),
    (r"transformer\.h\.mlp\.c_proj\.kernel", "in"),
    (r"model\.layers\.self_attn\.[qkv]_proj\.(kernel|bias)", "out"),
    (r"model\.layers\.mlp\.up_proj\.(kernel|bias)", "out"),
    (r"model\.layers\.self_attn\.o_proj\.kernel", "in"),
    (r"model\.layers\.mlp\.down_proj\.kernel", "in"),
    (r"roformer\.encoder\.layer\.attention\.self_attention\.(query|key|value)\.(kernel|bias)", "out"),
    (r"roformer\.encoder\.layer\.intermediate\.dense\.(kernel|bias)", "out"),
    (r"roformer\.encoder\.layer\.attention\.output\.dense\.kernel", "in"),
    (r"roformer\.encoder\.layer\.output\.dense\.kernel", "in"),
    # MEGA: only the normalized FFN. Splitting v_proj / h_proj makes XLA's CPU partitioner hand
    # the EMA's FFT a transposed layout, which the CPU FFT thunk rejects (RET_CHECK in fft_thunk.cc).
    (r"mega\.layers\.nffn\.fc1\.(kernel|bias)", "out"),
    (r"mega\.layers\.nffn\.fc2\.kernel", "in"),
]


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A (data, model) mesh over the first data * model devices."""
    devices = list(devices if devices is not None else jax.devices())
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} available")
    import numpy as np

    return Mesh(np.array(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def param_specs(params: Any, mesh: Mesh) -> Any:
    """A PartitionSpec for every leaf of a param tree (same structure)."""
    model_size = mesh.shape[MODEL]
    specs = []
    for path, leaf in tree_paths(params):
        spec = P()
        for pattern, side in TENSOR_PARALLEL_RULES:
            if re.fullmatch(pattern, path):
                is_bias = path.endswith(".bias")
                axis = leaf.ndim - 1 if (side == "out" or is_bias) else leaf.ndim - 2
                if leaf.shape[axis] % model_size == 0:
                    parts = [None] * leaf.ndim
                    parts[axis] = MODEL
                    spec = P(*parts)
                break
        specs.append(spec)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), specs)


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Place every leaf on the mesh with its tensor-parallel spec."""
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)), params, specs)


def shard_batch(array: Any, mesh: Mesh) -> Any:
    """Split an input's leading (batch) axis over the data axis (replicated if it does not divide)."""
    if array is None:
        return None
    batch_axis = DATA if array.shape[0] % mesh.shape[DATA] == 0 else None
    spec = P(batch_axis, *([None] * (array.ndim - 1)))
    return jax.device_put(array, NamedSharding(mesh, spec))
