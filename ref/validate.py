"""Input checks shared by every family: clear errors before any compute.

Shapes are checked always (they are static); values (token ids, positions) only when
concrete — inside `jit` they are tracers and the check is skipped, so a jitted forward
pays nothing for it. JAX gathers clamp out-of-range indices silently, hence these checks.
"""

from __future__ import annotations

from refjax import nn


def check_token_inputs(*, vocab_size: int, hidden_size: int, input_ids, attention_mask, position_ids, inputs_embeds,
                       cache, max_positions: int | None, positions_field: str = "max_position_embeddings", token_type_ids=None, type_vocab_size: int | None = None,
                       allow_choices: bool = False) -> tuple[int, ...]:
    """Validate the common token inputs; returns the token shape ([B, T] or [B, C, T])."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size):
        raise ValueError(f"inputs_embeds must be [batch, seq, {hidden_size}], got {list(inputs_embeds.shape)}")
    shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:-1])
    ranks = (2, 3) if allow_choices else (2,)
    if len(shape) not in ranks or 0 in shape:
        what = "[batch, seq] (or [batch, choices, seq])" if allow_choices else "[batch, seq]"
        raise ValueError(f"input_ids must be a non-empty {what} array, got {list(shape)}")
    if input_ids is not None:
        nn.check_ids(input_ids, vocab_size, "input_ids")
    for name, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {list(value.shape)}; input_ids has {list(shape)}")
    if token_type_ids is not None:
        nn.check_ids(token_type_ids, type_vocab_size, "token_type_ids", "type vocabulary size")
    filled = 0
    if cache is not None:
        filled = int(cache.length) if nn.is_concrete(cache.length) else 0
        if filled + shape[-1] > cache.max_length:
            raise ValueError(f"{shape[-1]} new tokens do not fit the cache ({filled} of {cache.max_length} slots used)")
    if max_positions is not None:
        nn.check_ids(position_ids, max_positions, "position_ids", positions_field)
        if position_ids is None and filled + shape[-1] > max_positions:
            raise ValueError(f"sequence length {filled + shape[-1]} exceeds the position table "
                             f"({positions_field}={max_positions})")
    return shape


def check_labels(labels, name: str, shape: tuple[int, ...], num_classes: int | None, what: str = "classes",
                 ignore_index: int | None = None, shape_source: str | None = None):
    """Labels must have `shape`; class labels must lie in [0, num_classes) or be ignore_index.

    torch's losses raise on an out-of-range class; a JAX gather would silently give NaN or
    wrap a negative index, so this is checked before compute (when concrete).
    `what` names the bound (e.g. "num_labels"); `shape_source` names where `shape` comes from."""
    if labels is None:
        return
    if tuple(labels.shape) != tuple(shape):
        expected = f"{shape_source} has {list(shape)}" if shape_source else f"expected {list(shape)}"
        raise ValueError(f"{name} has shape {list(labels.shape)}; {expected}")
    if num_classes is None or not nn.is_concrete(labels):
        return
    import jax.numpy as jnp
    import numpy as np

    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    values = np.asarray(labels)
    if ignore_index is not None:
        values = values[values != ignore_index]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        bad = int(values.min()) if values.min() < 0 else int(values.max())
        ignored = f"; {ignore_index} marks an ignored position" if ignore_index is not None else ""
        raise ValueError(f"{name} contains {bad}, outside [0, {num_classes}) ({what}={num_classes}){ignored}")


def as_arrays(**inputs):
    """Accept lists and numpy arrays as HF accepts tensors: everything becomes a jax array."""
    import jax.numpy as jnp

    return {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()}


def check_task_labels(task: str, labels, token_shape: tuple[int, ...], num_classes: int,
                      problem_type: str | None = None) -> None:
    """Labels of the shared heads. task: "lm" (token ids or -100, one per token),
    "token" (classes or -100, one per token), "sequence" (by problem_type, as HF infers it)."""
    if labels is None:
        return
    from refjax.losses import IGNORE_INDEX, infer_problem_type

    if task in ("lm", "token"):
        what = "vocab_size" if task == "lm" else "num_labels"
        check_labels(labels, "labels", token_shape, num_classes, what, IGNORE_INDEX, shape_source="input_ids")
        return
    batch = token_shape[0]
    kind = infer_problem_type(problem_type, num_classes, labels)
    if kind == "single_label_classification":
        check_labels(labels.reshape(-1) if labels.size == batch else labels, "labels", (batch,), num_classes,
                     "num_labels")
    elif kind == "regression":
        if labels.size != batch * num_classes:
            raise ValueError(f"regression labels have shape {list(labels.shape)}; expected {batch * num_classes} "
                             f"values ([batch{', num_labels' if num_classes > 1 else ''}])")
    else:
        check_labels(labels, "labels", (batch, num_classes), None)
