"""The HF shell: what every `*For*` class does around its base model, written once.

A family file is a math core (embed -> attention -> mlp -> block -> `model`) and, at its
end, its HF classes as data: `CLASSES = Classes(heads={architecture: Head(...)}, ...)`.
Its `forward` is then three steps that every family shares:

    batch = shell.prepare(CLASSES, config, inputs, ...)   # coerce, validate, flatten choices
    body = model(params.<body>, config, batch.tokens, ...)  # the math core -> `Body`
    return shell.finish(CLASSES, params, config, batch, body, ...)  # head, loss, `Output`

The shell knows no family: it imports building blocks only (heads, losses, validate) and
the families import it. Shapes use the alphabet of `refjax.nn` (B, C choices, T, D, V, L).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Literal, Mapping, NamedTuple

import jax

from refjax import losses
from refjax.heads import Output
from refjax.validate import as_arrays, check_labels, check_task_labels, check_token_inputs

# Which labels a head takes and which loss it computes (HF's `*For*` forward bodies):
#   base          the bare model: no head, no labels (HF `*Model`)
#   causal_lm     logits [.., T, V]; labels shifted left (HF `ForCausalLMLoss`)
#   masked_lm     logits [.., T, V]; every position predicts its own label
#   sequence      logits [B, num_labels]; MSE / cross-entropy / BCE by problem_type
#   token         logits [B, T, num_labels]; cross-entropy over labels != -100
#   choice        logits [B, C]; cross-entropy over choices
#   qa            start_logits, end_logits [B, T]; HF's clamped span loss
#   double_heads  causal_lm plus mc_logits [B, C] with mc_labels (GPT2DoubleHeadsModel)
Task = Literal["base", "causal_lm", "masked_lm", "sequence", "token", "choice", "qa", "double_heads"]

# The token inputs the math core sees ([B, T] each; [B, T, E] for inputs_embeds).
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


class Tokens(NamedTuple):
    """What a math core's `model` reads: [B, T] token inputs (choices already flattened)."""

    input_ids: jax.Array | None = None  # [B, T] int
    attention_mask: jax.Array | None = None  # [B, T], 1 = real token
    token_type_ids: jax.Array | None = None  # [B, T] int
    position_ids: jax.Array | None = None  # [B, T] int
    inputs_embeds: jax.Array | None = None  # [B, T, E]

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T)."""
        return tuple(self.input_ids.shape) if self.input_ids is not None else tuple(self.inputs_embeds.shape[:2])


class Body(NamedTuple):
    """What a math core's `model` returns: HF's `BaseModelOutput*` fields, stacked."""

    last_hidden_state: jax.Array  # [B, T, D]
    hidden_states: jax.Array  # [L + 1, B, T, D]: the embedding output, then every layer's
    attentions: jax.Array | None = None  # [L, B, N, T, S]
    cache: Any = None  # the updated cache, when one was given
    taps: dict | None = None  # named intermediates; per-layer ones stacked [L, ...]
    pooler_output: jax.Array | None = None  # [B, D], models that build a pooler


@dataclasses.dataclass(frozen=True)
class Head:
    """One HF class as data.

    outputs: (params, config, hidden [B, T, D], batch, **head_options) -> output fields
        (`logits`, or `start_logits`/`end_logits`, `mc_logits`, `pooler_output`); None for
        the bare model. `hidden` is [B, C, T, D] for heads with `unflatten`.
    choices: None, or "optional"/"required": the head takes [B, C, T] inputs, which the body
        sees flattened to [B*C, T] (HF `*ForMultipleChoice`, `GPT2DoubleHeadsModel`).
    unflatten: last_hidden_state and hidden_states go back to [.., B, C, T, D] (GPT-2's
        double heads); otherwise they stay [.., B*C, T, D], as HF returns them.
    check: extra input checks of this head, (config, batch) -> None, raising ValueError.
    """

    task: Task
    outputs: Callable[..., dict[str, jax.Array]] | None = None
    choices: Literal["optional", "required"] | None = None
    unflatten: bool = False
    check: Callable[[Any, "Batch"], None] | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What bounds a family's inputs (from its config); checked before any compute."""

    embed_width: int  # the last axis of inputs_embeds
    positions: int | None = None  # size of the position table (None: no table, e.g. RoPE)
    positions_field: str = "max_position_embeddings"  # the config key named in errors
    type_vocab: int | None = None  # rows of the token-type table


@dataclasses.dataclass(frozen=True)
class Classes:
    """A family's HF classes: its heads by architecture, the inputs its forward takes, and
    what bounds them. `check`: family rules on top of the shared ones, (config, tokens,
    cache) -> None, run on the flattened token inputs."""

    family: str
    heads: Mapping[str, Head]
    inputs: tuple[str, ...]
    limits: Callable[[Any], Limits]
    check: Callable[[Any, Tokens, Any], None] | None = None


class Batch(NamedTuple):
    """A validated call: the head, the body's token inputs and everything else."""

    head: Head
    tokens: Tokens  # flattened to [B*C, T] for choice heads
    inputs: dict[str, jax.Array | None]  # every input as given (labels, mc_token_ids, ...), as arrays
    shape: tuple[int, ...]  # the token shape as given: [B, T] or [B, C, T]

    @property
    def choices(self) -> int | None:
        return self.shape[1] if len(self.shape) == 3 else None


# ---------------------------------------------------------------------------------------
# prepare: inputs -> Batch
# ---------------------------------------------------------------------------------------


def check_names(classes: Classes, inputs: Mapping[str, Any]) -> None:
    """An input the family's HF forward does not take is an error naming the near matches."""
    for name in inputs:
        if name not in classes.inputs:
            near = difflib.get_close_matches(name, classes.inputs, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; accepted: {', '.join(classes.inputs)}"
            raise TypeError(f"{classes.family} forward got an unexpected input {name!r}{hint}")


def _token_shape(arch: str, head: Head, x: dict) -> tuple[int, ...]:
    """The shape of the token inputs as given, with choice heads' rank rules."""
    ids, embeds = x["input_ids"], x["inputs_embeds"]
    if head.choices is None or (ids is None and embeds is None):
        return ()
    shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:-1])
    if head.choices == "required" and len(shape) != 3:
        name = "input_ids" if ids is not None else "inputs_embeds"
        raise ValueError(f"{arch} needs {name} of shape [batch, choices, seq"
                         f"{', width' if name == 'inputs_embeds' else ''}], got "
                         f"{list(ids.shape if ids is not None else embeds.shape)}")
    return shape


def prepare(classes: Classes, config, inputs: Mapping[str, Any], *, cache=None, fast: bool = False,
            taps: bool = False, output_attentions: bool = False, patch=None, train: bool = False) -> Batch:
    """Coerce and validate one call, before any compute: input names, shapes, ids and
    positions in range (when concrete), labels by the head's task; then flatten choices.
    Raises ValueError (TypeError for an unknown input name) naming the culprit."""
    check_names(classes, inputs)
    x = as_arrays(**{name: inputs.get(name) for name in classes.inputs})
    x = {**dict.fromkeys(TOKEN_INPUTS), **x}  # token inputs a family does not take (RoFormer: position_ids): None
    arch = config.architecture
    head = classes.heads[arch]
    if fast and (output_attentions or taps):
        raise ValueError("fast=True computes no attention probabilities; use fast=False for attentions or taps")
    if fast and (patch or train):
        raise ValueError("fast=True runs a fused attention kernel: patch= and train= need the readable path "
                         "(fast=False)")
    limits = classes.limits(config)

    shape = _token_shape(arch, head, x)
    if len(shape) == 3:  # [B, C, T]: check every token input against it, then view as [B*C, T]
        for name in ("attention_mask", "token_type_ids", "position_ids"):
            if x[name] is not None and tuple(x[name].shape) != shape:
                raise ValueError(f"{name} has shape {list(x[name].shape)}; input_ids has {list(shape)}")
        flat = {name: None if x[name] is None else x[name].reshape(-1, *x[name].shape[2:]) for name in TOKEN_INPUTS}
    else:
        flat = {name: x[name] for name in TOKEN_INPUTS}
    tokens = Tokens(**flat)
    token_shape = check_token_inputs(
        vocab_size=config.vocab_size, hidden_size=limits.embed_width, input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask, position_ids=tokens.position_ids, inputs_embeds=tokens.inputs_embeds,
        cache=cache, max_positions=limits.positions, positions_field=limits.positions_field,
        token_type_ids=tokens.token_type_ids, type_vocab_size=limits.type_vocab)
    shape = shape or token_shape
    if classes.check is not None:
        classes.check(config, tokens, cache)
    batch = Batch(head=head, tokens=tokens, inputs=x, shape=shape)
    _check_labels(config, batch)
    if head.check is not None:
        head.check(config, batch)
    return batch


def _check_labels(config, batch: Batch) -> None:
    task, labels, shape = batch.head.task, batch.inputs.get("labels"), batch.shape
    if task in ("causal_lm", "masked_lm", "double_heads"):
        check_task_labels("lm", labels, shape, config.vocab_size)
    elif task == "sequence":
        check_task_labels("sequence", labels, shape, config.num_labels, config.problem_type)
    elif task == "token":
        check_task_labels("token", labels, shape, config.num_labels)
    elif task == "choice" and labels is not None:
        if batch.choices is None:
            raise ValueError(f"{config.architecture} needs input_ids [batch, choices, seq] with labels, "
                             f"got {list(shape)}")
        check_labels(labels, "labels", shape[:1], batch.choices, "choices", shape_source="input_ids' batch")


# ---------------------------------------------------------------------------------------
# finish: Body -> Output
# ---------------------------------------------------------------------------------------


def task_loss(task: Task, config, fields: Mapping[str, jax.Array], inputs: Mapping[str, Any]) -> dict:
    """The loss(es) of a head's task from its output fields and the labels given (none: {})."""
    labels = inputs.get("labels")
    if task == "qa":
        start, end = inputs.get("start_positions"), inputs.get("end_positions")
        if start is None or end is None:
            return {}
        return {"loss": losses.span_loss(fields["start_logits"], fields["end_logits"], start, end)}
    out = {}
    if task == "double_heads" and inputs.get("mc_labels") is not None:
        mc_logits = fields["mc_logits"]
        out["mc_loss"] = losses.cross_entropy(mc_logits.reshape(-1, mc_logits.shape[-1]),
                                              inputs["mc_labels"].reshape(-1))
    if labels is None or task == "base":
        return out
    logits = fields["logits"]
    if task in ("causal_lm", "double_heads"):
        out["loss"] = losses.causal_lm_loss(logits, labels)
    elif task in ("masked_lm", "token"):
        out["loss"] = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    elif task == "sequence":
        out["loss"] = losses.sequence_classification_loss(logits, labels, config.num_labels, config.problem_type)
    elif task == "choice":
        out["loss"] = losses.cross_entropy(logits, labels.reshape(-1))
    return out


def finish(classes: Classes, params, config, batch: Batch, body: Body, *, output_hidden_states: bool = False,
           output_attentions: bool = False, probe=None, **head_options) -> Output:
    """Run the head on the body's output, add its loss, and pack HF's output fields.
    `probe` (ref/probe.py), when the family threads one, is handed to the head too (its
    dropout sites), and what the head records joins the body's taps."""
    head = batch.head
    last, hidden_states = body.last_hidden_state, body.hidden_states
    if head.unflatten:  # [B*C, T, D] -> batch.shape + [D]
        last = last.reshape(*batch.shape, last.shape[-1])
        hidden_states = hidden_states.reshape(hidden_states.shape[0], *batch.shape, hidden_states.shape[-1])
    if probe is not None:
        head_options["probe"] = probe
    fields = {} if head.outputs is None else head.outputs(params, config, last, batch, **head_options)
    fields = {**fields, **task_loss(head.task, config, fields, batch.inputs)}
    if head.task == "base":
        fields.setdefault("pooler_output", body.pooler_output)
    taps = body.taps
    if taps is not None and probe is not None:  # sites the head recorded (its dropout masks)
        taps = {**taps, **{name: value for name, value in probe.recorded.items() if name not in taps}}
    return Output(last_hidden_state=last, hidden_states=hidden_states if output_hidden_states else None,
                  attentions=body.attentions if output_attentions else None, cache=body.cache, taps=taps,
                  **fields)


def choice_logits(logits: jax.Array, batch: Batch) -> jax.Array:
    """One score per flattened row [B*C, 1] -> [B, C] (C = 1 for [B, T] inputs), as HF views them."""
    return logits.reshape(-1, batch.choices or 1)


def first_token(hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> [B, D] at position 0 (BERT's <s>/[CLS] pooling)."""
    return hidden[:, 0]
