"""What a MEGA checkpoint is: the config, the parameter pytree and its HF tensor names.

Mirrors `transformers/models/deprecated/mega/{configuration,modeling}_mega.py` (HF 4.57.6,
the last release with MEGA). HF `mega.layers.3.mega_layer.v_proj` is
`params.mega.layers.mega_layer.v_proj` here, layers stacked on a leading axis. `nn.Linear`
weights [out, in] are stored transposed as kernel [in, out]; the EMA tensors keep HF's
shapes. Sizes: D hidden_size, E intermediate_size, Z shared_representation_size,
N ema_projection_size, F nffn_hidden_size, V vocab, L layers; the EMA has K = 2D kernels
when bidirectional, else D.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from refjax.params.common import Embedding, Linear
from refjax.params.config import ACTIVATIONS, ConfigError, _common, _family_architecture, _Fields
from refjax.params.io import NameRule

MEGA_ARCHITECTURES = (
    "MegaModel",
    "MegaForCausalLM",
    "MegaForMaskedLM",
    "MegaForSequenceClassification",
    "MegaForMultipleChoice",
    "MegaForTokenClassification",
    "MegaForQuestionAnswering",
)
NORMALIZATION_TYPES = ("scalenorm", "layernorm", "rmsnorm", "batchnorm", "syncbatchnorm")
ATTENTION_ACTIVATIONS = ("softmax", "laplace", "relu2")
RELATIVE_POSITIONAL_BIASES = ("simple", "rotary")


@dataclasses.dataclass(frozen=True)
class MegaConfig:
    """HF `MegaConfig` plus the head it is used with (`architecture`)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    ema_projection_size: int
    bidirectional: bool
    shared_representation_size: int
    use_chunking: bool
    chunk_size: int
    truncation: int | None
    normalize_before_mega: bool
    normalization_type: str
    norm_affine: bool
    activation: str
    attention_activation: str
    use_feature_dropout: bool  # training mode only: drop whole feature channels (HF's dropout2d) instead of entries
    use_normalized_ffn: bool
    nffn_hidden_size: int
    normalize_before_ffn: bool
    max_positions: int
    add_token_type_embeddings: bool
    type_vocab_size: int
    relative_positional_bias: str
    add_lm_hidden_dense_layer: bool
    is_decoder: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    pad_token_id: int | None
    num_labels: int
    problem_type: str | None
    # dropout rates (HF's training mode, `forward(..., train=True)`; inference ignores them)
    dropout_prob: float = 0.1  # mega_layer.dropout (EMA output, attention output) and nffn.dropout (fc2 output)
    hidden_dropout_prob: float = 0.1  # mega_layer.hidden_dropout (values); the heads' fallback rate
    attention_probs_dropout_prob: float = 0.1  # mega_layer.attention_dropout (attention weights; never featurewise)
    nffn_activation_dropout_prob: float = 0.1  # nffn.hidden_dropout (after fc1's activation)
    classifier_dropout: float | None = None  # the classification heads' dropout (None: hidden_dropout_prob, as HF)

    @property
    def ema_kernels(self) -> int:
        """Rows of the EMA parameters: 2D when bidirectional (one set per direction), else D."""
        return 2 * self.hidden_size if self.bidirectional else self.hidden_size

    @property
    def bias_positions(self) -> int:
        """How far the relative position bias reaches: HF uses chunk_size whenever it is >= 0
        (even with use_chunking false), else max_positions."""
        return self.max_positions if self.chunk_size < 0 else self.chunk_size


MEGA_IGNORED = {
    "model_type": "checked to be 'mega'",
    "ema_delta_alpha_range": "initialisation range only",
    "ema_beta_range": "initialisation range only",
    "ema_gamma_omega_range": "initialisation range only",
    "num_attention_heads": "HF sets it to 1 and never reads it (MEGA's attention is single-headed)",
}


def parse_mega_config(raw: Mapping[str, Any], architecture: str | None = None) -> MegaConfig:
    """Parse a MEGA config.json dict with HF's `MegaConfig` defaults; unknown keys are errors."""
    f = _Fields(raw, "mega")
    architecture = _family_architecture(raw, "mega", architecture, MEGA_ARCHITECTURES)
    if f.bool("add_cross_attention", False):
        raise ConfigError("mega config: field 'add_cross_attention' must be false: refjax implements MEGA's "
                          "self-attention models only (cross-attention needs encoder_hidden_states)")
    use_chunking = f.bool("use_chunking", False)
    chunk_size = f.int("chunk_size", -1, minimum=None)
    if use_chunking and chunk_size < 1:
        raise ConfigError(f"mega config: field 'chunk_size' must be >= 1 when 'use_chunking' is true, got {chunk_size}")
    if chunk_size == 0:
        raise ConfigError("mega config: field 'chunk_size' must be >= 1 or negative (unset), got 0")
    truncation = f.int("truncation", None, optional=True)
    bias_type = f.choice("relative_positional_bias", "rotary", RELATIVE_POSITIONAL_BIASES)
    hidden = f.int("hidden_size", 128)
    shared = f.int("shared_representation_size", 64)
    if bias_type == "rotary" and (hidden % 2 or shared % 2):
        raise ConfigError(f"mega config: rotary relative bias needs even 'hidden_size' and "
                          f"'shared_representation_size', got {hidden} and {shared}")
    config = MegaConfig(
        architecture=architecture,
        vocab_size=f.int("vocab_size", 30522),
        hidden_size=hidden,
        num_hidden_layers=f.int("num_hidden_layers", 4),
        intermediate_size=f.int("intermediate_size", 256),
        ema_projection_size=f.int("ema_projection_size", 16),
        bidirectional=f.bool("bidirectional", True),
        shared_representation_size=shared,
        use_chunking=use_chunking,
        chunk_size=chunk_size,
        truncation=truncation,
        normalize_before_mega=f.bool("normalize_before_mega", True),
        normalization_type=f.choice("normalization_type", "scalenorm", NORMALIZATION_TYPES),
        norm_affine=f.bool("norm_affine", True),
        activation=f.choice("activation", "silu", ACTIVATIONS),
        attention_activation=f.choice("attention_activation", "softmax", ATTENTION_ACTIVATIONS),
        use_feature_dropout=f.bool("use_feature_dropout", False),
        use_normalized_ffn=f.bool("use_normalized_ffn", True),
        nffn_hidden_size=f.int("nffn_hidden_size", 256),
        normalize_before_ffn=f.bool("normalize_before_ffn", True),
        max_positions=f.int("max_positions", 2048),
        add_token_type_embeddings=f.bool("add_token_type_embeddings", False),
        type_vocab_size=f.int("type_vocab_size", 2),
        relative_positional_bias=bias_type,
        add_lm_hidden_dense_layer=f.bool("add_lm_hidden_dense_layer", True),
        is_decoder=f.bool("is_decoder", False),
        tie_word_embeddings=f.bool("tie_word_embeddings", True),
        bos_token_id=f.token_id("bos_token_id") if "bos_token_id" in raw else 0,
        eos_token_id=f.token_id("eos_token_id", allow_list=True) if "eos_token_id" in raw else 2,
        pad_token_id=f.token_id("pad_token_id") if "pad_token_id" in raw else 1,
        dropout_prob=f.probability("dropout_prob", 0.1),
        hidden_dropout_prob=f.probability("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=f.probability("attention_probs_dropout_prob", 0.1),
        nffn_activation_dropout_prob=f.probability("nffn_activation_dropout_prob", 0.1),
        classifier_dropout=f.probability("classifier_dropout", None, optional=True),
        **_common(f),
    )
    f.check_all_used(MEGA_IGNORED)
    if config.normalization_type == "layernorm" and not config.norm_affine:
        raise ConfigError("mega config: normalization_type 'layernorm' with norm_affine false is not supported: HF's "
                          "MegaPreTrainedModel._init_weights fails on a LayerNorm without weight and bias")
    if config.pad_token_id is not None and not 0 <= config.pad_token_id < config.vocab_size:
        raise ConfigError(f"mega config: field 'pad_token_id' ({config.pad_token_id}) must lie in "
                          f"[0, vocab_size={config.vocab_size}) (HF's embedding has padding_idx = pad_token_id)")
    if architecture == "MegaForQuestionAnswering" and config.num_labels != 2:
        raise ConfigError(f"mega config: MegaForQuestionAnswering needs num_labels = 2 (start and end logits), "
                          f"got {config.num_labels}")
    return config


# --------------------------------------------------------------------------------------
# Parameter tree
# --------------------------------------------------------------------------------------

class MegaNorm(eqx.Module):
    """HF `MegaSequenceNorm`'s inner norm; which fields exist depends on normalization_type:
    scalenorm: weight [1] (HF `scalar`); rmsnorm: weight [D]; layernorm: weight, bias [D];
    (sync)batchnorm: weight, bias, running_mean, running_var [D]. No weight/bias without norm_affine."""

    weight: jax.Array | None = None
    bias: jax.Array | None = None
    running_mean: jax.Array | None = None
    running_var: jax.Array | None = None


class MegaEma(eqx.Module):
    """HF `MegaMultiDimensionDampedEma` (paper: delta, alpha, beta, gamma, omega)."""

    damping_factor: jax.Array  # delta [K, N, 1]
    decay_factor: jax.Array  # alpha [K, N, 1]
    ema_expansion_matrix: jax.Array  # beta [K, N, 1]
    kernel_projection_matrix: jax.Array  # gamma [K, N]
    residual_weight: jax.Array  # omega [D]


class MegaRelativeBias(eqx.Module):
    """simple: rel_pos_bias [2 * max_positions - 1]; rotary: alpha, b_param [1, Z]."""

    rel_pos_bias: jax.Array | None = None
    alpha: jax.Array | None = None
    b_param: jax.Array | None = None


class MegaGatedAttention(eqx.Module):
    """HF `MegaMovingAverageGatedAttention`."""

    norm: MegaNorm
    ema_gate: MegaEma
    v_proj: Linear  # [D, E]
    mx_proj: Linear  # [D, Z + E + 2D]
    h_proj: Linear  # [E, D]
    qk_weight: jax.Array  # [2, Z]
    qk_bias: jax.Array  # [2, Z]
    rel_pos_bias: MegaRelativeBias


class MegaFFN(eqx.Module):
    """HF `MegaNormalizedFeedForwardNetwork`."""

    norm: MegaNorm
    fc1: Linear  # [D, F]
    fc2: Linear  # [F, D]


class MegaLayer(eqx.Module):
    """HF `MegaBlock`; every leaf has a leading layer axis [L, ...]."""

    mega_layer: MegaGatedAttention
    nffn: MegaFFN | None = None


class MegaBody(eqx.Module):
    """HF `MegaModel`."""

    word_embeddings: Embedding  # [V, D]
    token_type_embeddings: Embedding | None  # [type_vocab_size, D]
    layers: MegaLayer
    pooler: Linear | None = None  # [D, D], MegaModel and MegaForMultipleChoice only


class MegaClassificationHead(eqx.Module):
    dense: Linear  # [D, D]
    out_proj: Linear  # [D, num_labels]


class MegaParams(eqx.Module):
    """A MEGA body with the head its architecture needs; other head fields are None."""

    mega: MegaBody
    dense: Linear | None = None  # LM heads' hidden dense layer (add_lm_hidden_dense_layer)
    lm_head: Linear | None = None  # [D, V] + bias [V]; kernel None when tied to the word embeddings
    classifier: Any = None  # Linear (token cls [D, labels], multiple choice [D, 1]) or MegaClassificationHead
    qa_outputs: Linear | None = None  # [D, 2]


def _norm_skeleton(config: MegaConfig, s) -> MegaNorm:
    D, t, affine = config.hidden_size, config.normalization_type, config.norm_affine
    if t == "scalenorm":
        return MegaNorm(weight=s(1) if affine else None)
    if t == "rmsnorm":
        return MegaNorm(weight=s(D) if affine else None)
    if t == "layernorm":
        return MegaNorm(weight=s(D) if affine else None, bias=s(D) if affine else None)
    return MegaNorm(weight=s(D) if affine else None, bias=s(D) if affine else None, running_mean=s(D),
                    running_var=s(D))


def skeleton(config: MegaConfig, dtype=np.float32) -> MegaParams:
    """The parameter tree with `jax.ShapeDtypeStruct` leaves: shapes without memory."""
    D, E, Z, N, F = (config.hidden_size, config.intermediate_size, config.shared_representation_size,
                     config.ema_projection_size, config.nffn_hidden_size)
    V, L, K = config.vocab_size, config.num_hidden_layers, config.ema_kernels

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def layered(*shape):
        return s(L, *shape)

    def proj(n_in, n_out):
        return Linear(layered(n_in, n_out), layered(n_out))

    def layer_norm_tree():
        return jax.tree.map(lambda a: s(L, *a.shape), _norm_skeleton(config, s))

    if config.relative_positional_bias == "simple":
        bias = MegaRelativeBias(rel_pos_bias=layered(2 * config.max_positions - 1))
    else:
        bias = MegaRelativeBias(alpha=layered(1, Z), b_param=layered(1, Z))
    attention = MegaGatedAttention(
        norm=layer_norm_tree(),
        ema_gate=MegaEma(damping_factor=layered(K, N, 1), decay_factor=layered(K, N, 1),
                         ema_expansion_matrix=layered(K, N, 1), kernel_projection_matrix=layered(K, N),
                         residual_weight=layered(D)),
        v_proj=proj(D, E), mx_proj=proj(D, Z + E + 2 * D), h_proj=proj(E, D),
        qk_weight=layered(2, Z), qk_bias=layered(2, Z), rel_pos_bias=bias)
    nffn = MegaFFN(norm=layer_norm_tree(), fc1=proj(D, F), fc2=proj(F, D)) if config.use_normalized_ffn else None
    arch = config.architecture
    body = MegaBody(
        word_embeddings=Embedding(s(V, D)),
        token_type_embeddings=Embedding(s(config.type_vocab_size, D)) if config.add_token_type_embeddings else None,
        layers=MegaLayer(mega_layer=attention, nffn=nffn),
        pooler=Linear(s(D, D), s(D)) if arch in ("MegaModel", "MegaForMultipleChoice") else None,
    )
    heads: dict[str, Any] = {}
    if arch in ("MegaForCausalLM", "MegaForMaskedLM"):
        if config.add_lm_hidden_dense_layer:
            heads["dense"] = Linear(s(D, D), s(D))
        heads["lm_head"] = Linear(None if config.tie_word_embeddings else s(D, V), s(V))
    elif arch == "MegaForSequenceClassification":
        heads["classifier"] = MegaClassificationHead(dense=Linear(s(D, D), s(D)),
                                                     out_proj=Linear(s(D, config.num_labels), s(config.num_labels)))
    elif arch == "MegaForTokenClassification":
        heads["classifier"] = Linear(s(D, config.num_labels), s(config.num_labels))
    elif arch == "MegaForMultipleChoice":
        heads["classifier"] = Linear(s(D, 1), s(1))
    elif arch == "MegaForQuestionAnswering":
        heads["qa_outputs"] = Linear(s(D, 2), s(2))
    return MegaParams(mega=body, **heads)


def base_prefix(config: MegaConfig) -> str:
    """HF saves `MegaModel` with bare keys and every head with the body under `mega.`."""
    return "" if config.architecture == "MegaModel" else "mega."


def _norm_rules(ours: str, hf: str, config: MegaConfig) -> list[NameRule]:
    inner = f"{hf}.norm.norm"
    weight = "scalar" if config.normalization_type == "scalenorm" else "weight"
    return [NameRule(f"{ours}.norm.weight", f"{inner}.{weight}"), NameRule(f"{ours}.norm.bias", f"{inner}.bias"),
            NameRule(f"{ours}.norm.running_mean", f"{inner}.running_mean"),
            NameRule(f"{ours}.norm.running_var", f"{inner}.running_var")]


def name_rules(config: MegaConfig) -> list[NameRule]:
    """Tree path <-> HF key for every leaf of `skeleton(config)`; `{i}` is the layer index."""
    p = base_prefix(config)
    lay, hl = "mega.layers.mega_layer", f"{p}layers.{{i}}.mega_layer"
    rules = [
        NameRule("mega.word_embeddings.table", f"{p}embedding_layer.word_embeddings.weight"),
        NameRule("mega.token_type_embeddings.table", f"{p}embedding_layer.token_type_embeddings.weight"),
        NameRule("mega.pooler.kernel", f"{p}pooler.dense.weight", transpose=True),
        NameRule("mega.pooler.bias", f"{p}pooler.dense.bias"),
        *_norm_rules(lay, hl, config),
        *_norm_rules("mega.layers.nffn", f"{p}layers.{{i}}.nffn", config),
    ]
    for name in ("damping_factor", "decay_factor", "ema_expansion_matrix", "kernel_projection_matrix",
                 "residual_weight"):
        rules.append(NameRule(f"{lay}.ema_gate.{name}", f"{hl}.ema_gate.{name}"))
    for name in ("qk_weight", "qk_bias", "rel_pos_bias.rel_pos_bias", "rel_pos_bias.alpha", "rel_pos_bias.b_param"):
        rules.append(NameRule(f"{lay}.{name}", f"{hl}.{name}"))
    linears = [(f"{lay}.{m}", f"{hl}.{m}") for m in ("v_proj", "mx_proj", "h_proj")]
    linears += [(f"mega.layers.nffn.{m}", f"{p}layers.{{i}}.nffn.{m}") for m in ("fc1", "fc2")]
    linears += [("dense", "dense"), ("lm_head", "lm_head" if config.architecture == "MegaForCausalLM" else "mlm_head"),
                ("classifier", "classifier"), ("classifier.dense", "classifier.dense"),
                ("classifier.out_proj", "classifier.out_proj"), ("qa_outputs", "qa_outputs")]
    for ours, hf in linears:
        rules.append(NameRule(f"{ours}.kernel", f"{hf}.weight", transpose=True))
        rules.append(NameRule(f"{ours}.bias", f"{hf}.bias"))
    return rules


def dropped_keys(config: MegaConfig) -> dict[str, str]:
    """Checkpoint keys (regex) that real files hold but we do not load."""
    dropped = {
        r"(mega\.)?layers\.\d+\.mega_layer\.rel_pos_bias\._float_tensor":
            "HF's dtype/device marker buffer for the rotary sinusoids; holds no value",
        r"(mega\.)?layers\.\d+\.(mega_layer|nffn)\.norm\.norm\.num_batches_tracked":
            "BatchNorm training counter; eval mode uses the running statistics only",
    }
    if config.tie_word_embeddings:
        head = "lm_head" if config.architecture == "MegaForCausalLM" else "mlm_head"
        dropped[rf"{head}\.weight"] = "tied to the word embeddings, as HF ties it"
    return dropped


def random_params(config: MegaConfig, key, dtype=jnp.float32, scale: float = 0.3) -> MegaParams:
    """Random parameters for tests: N(0, scale) everywhere; batchnorm running_var kept positive."""
    leaves, treedef = jax.tree_util.tree_flatten(skeleton(config, dtype))
    keys = jax.random.split(key, len(leaves))
    values = [jax.random.normal(k, l.shape, l.dtype) * scale for k, l in zip(keys, leaves)]
    params = jax.tree_util.tree_unflatten(treedef, values)
    if config.normalization_type in ("batchnorm", "syncbatchnorm"):
        def positive(norm):
            return eqx.tree_at(lambda n: n.running_var, norm, 0.5 + jnp.abs(norm.running_var))
        params = eqx.tree_at(lambda p: p.mega.layers.mega_layer.norm, params,
                             positive(params.mega.layers.mega_layer.norm))
        if params.mega.layers.nffn is not None:
            params = eqx.tree_at(lambda p: p.mega.layers.nffn.norm, params, positive(params.mega.layers.nffn.norm))
    return params
