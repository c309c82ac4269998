"""What a GPT-2 checkpoint is: the parameter pytree and its Hugging Face tensor names.

Mirrors `transformers/models/gpt2/modeling_gpt2.py` module paths: `transformer.h.3.attn.c_attn`
in HF is `params.transformer.h.attn.c_attn` here, with the 12 layers stacked on a leading
axis so the forward pass can `lax.scan` over them. GPT-2 uses `Conv1D`, whose weight is
already [in, out]; the heads are `nn.Linear`, stored [out, in] in HF and transposed here.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

from refjax.params.common import Embedding, LayerNorm, Linear
from refjax.params.config import GPT2Config
from refjax.params.io import NameRule


class GPT2Attention(eqx.Module):
    c_attn: Linear  # [L, D, 3D]  fused q, k, v
    c_proj: Linear  # [L, D, D]


class GPT2MLP(eqx.Module):
    c_fc: Linear  # [L, D, F]
    c_proj: Linear  # [L, F, D]


class GPT2Block(eqx.Module):
    """One transformer block; every leaf has a leading layer axis [L, ...]."""

    ln_1: LayerNorm
    attn: GPT2Attention
    ln_2: LayerNorm
    mlp: GPT2MLP


class GPT2Body(eqx.Module):
    """HF `GPT2Model`."""

    wte: Embedding  # [V, D]  also the tied LM head
    wpe: Embedding  # [P, D]
    h: GPT2Block  # stacked over L
    ln_f: LayerNorm


class GPT2Params(eqx.Module):
    """A GPT-2 body with the head its architecture needs; the other head fields are None."""

    transformer: GPT2Body
    lm_head: Linear | None = None  # [D, V]; None when tied to transformer.wte (HF default)
    multiple_choice_head: Linear | None = None  # GPT2SequenceSummary.summary [D, summary_size]
    score: Linear | None = None  # [D, num_labels], no bias
    classifier: Linear | None = None  # [D, num_labels]
    qa_outputs: Linear | None = None  # [D, 2]


LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2DoubleHeadsModel")


def skeleton(config: GPT2Config, dtype=np.float32) -> GPT2Params:
    """The parameter tree with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    D, F, V, P, L = config.n_embd, config.inner_dim, config.vocab_size, config.n_positions, config.n_layer

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def norm(*lead):
        return LayerNorm(scale=s(*lead, D), bias=s(*lead, D))

    body = GPT2Body(
        wte=Embedding(s(V, D)),
        wpe=Embedding(s(P, D)),
        h=GPT2Block(
            ln_1=norm(L),
            attn=GPT2Attention(c_attn=Linear(s(L, D, 3 * D), s(L, 3 * D)), c_proj=Linear(s(L, D, D), s(L, D))),
            ln_2=norm(L),
            mlp=GPT2MLP(c_fc=Linear(s(L, D, F), s(L, F)), c_proj=Linear(s(L, F, D), s(L, D))),
        ),
        ln_f=norm(),
    )
    arch, heads = config.architecture, {}
    if arch in LM_ARCHITECTURES and not config.tie_word_embeddings:
        heads["lm_head"] = Linear(s(D, V))
    if arch == "GPT2DoubleHeadsModel" and config.summary_use_proj:
        heads["multiple_choice_head"] = Linear(s(D, config.summary_size), s(config.summary_size))
    if arch == "GPT2ForSequenceClassification":
        heads["score"] = Linear(s(D, config.num_labels))
    if arch == "GPT2ForTokenClassification":
        heads["classifier"] = Linear(s(D, config.num_labels), s(config.num_labels))
    if arch == "GPT2ForQuestionAnswering":
        heads["qa_outputs"] = Linear(s(D, 2), s(2))
    return GPT2Params(transformer=body, **heads)


def _body_rules(prefix: str) -> list[NameRule]:
    """HF names of the body; `{i}` is the layer index (stacked on axis 0 here)."""
    rules = [
        NameRule("transformer.wte.table", f"{prefix}wte.weight"),
        NameRule("transformer.wpe.table", f"{prefix}wpe.weight"),
        NameRule("transformer.ln_f.scale", f"{prefix}ln_f.weight"),
        NameRule("transformer.ln_f.bias", f"{prefix}ln_f.bias"),
    ]
    for ours, hf in [("ln_1.scale", "ln_1.weight"), ("ln_1.bias", "ln_1.bias"),
                     ("ln_2.scale", "ln_2.weight"), ("ln_2.bias", "ln_2.bias")]:
        rules.append(NameRule(f"transformer.h.{ours}", f"{prefix}h.{{i}}.{hf}"))
    for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        # Conv1D: weight already [in, out]
        rules.append(NameRule(f"transformer.h.{module}.kernel", f"{prefix}h.{{i}}.{module}.weight"))
        rules.append(NameRule(f"transformer.h.{module}.bias", f"{prefix}h.{{i}}.{module}.bias"))
    return rules


_HEAD_RULES = [  # nn.Linear heads: HF weight [out, in] -> kernel [in, out]
    NameRule("lm_head.kernel", "lm_head.weight", transpose=True),
    NameRule("multiple_choice_head.kernel", "multiple_choice_head.summary.weight", transpose=True),
    NameRule("multiple_choice_head.bias", "multiple_choice_head.summary.bias"),
    NameRule("score.kernel", "score.weight", transpose=True),
    NameRule("classifier.kernel", "classifier.weight", transpose=True),
    NameRule("classifier.bias", "classifier.bias"),
    NameRule("qa_outputs.kernel", "qa_outputs.weight", transpose=True),
    NameRule("qa_outputs.bias", "qa_outputs.bias"),
]


def name_rules(config: GPT2Config) -> list[NameRule]:
    """Tree path <-> HF key for every leaf of `skeleton(config)`.

    HF saves `GPT2Model` with bare keys (`h.0.ln_1.weight`) and every head class with
    the body under `transformer.`.
    """
    return _body_rules(base_prefix(config)) + _HEAD_RULES


def dropped_keys(config: GPT2Config) -> dict[str, str]:
    """Checkpoint keys (regex) that exist in real files but hold nothing we load."""
    dropped = {
        r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)": "causal-mask buffers of old checkpoints; recomputed",
    }
    if config.tie_word_embeddings:
        dropped[r"lm_head\.weight"] = "tied to transformer.wte.weight, as HF ties it"
    return dropped


def base_prefix(config: GPT2Config) -> str:
    """Where the body's keys live. HF's real `gpt2` checkpoint stores bare body keys
    (`h.0.ln_1.weight`) under a GPT2LMHeadModel config; HF (and the loader) accept that."""
    return "" if config.architecture == "GPT2Model" else "transformer."
