"""Run a checkpoint in Hugging Face PyTorch and dump refjax's taps, from forward hooks.

Usage (needs the `reference` extra, torch + transformers: pip install 'refjax[reference]'):
    refjax hf-taps CHECKPOINT_DIR --inputs IN.safetensors --out OUT.safetensors
                   [--dtype float32|float64|bfloat16]

Writes the tensors `refjax forward CHECKPOINT_DIR --inputs IN.safetensors --taps` writes
(the inputs too), under the same names and with the same "order" metadata, but computed
by HF's model (`attn_implementation="eager"`, eval mode), so that

    refjax forward CKPT --inputs IN.safetensors --out refjax.safetensors --taps
    refjax hf-taps CKPT --inputs IN.safetensors --out hf.safetensors
    refjax diff refjax.safetensors hf.safetensors

compares refjax with HF op by op. IN may also be a refjax dump (its inputs are used).

How each tap is obtained (docs/taps.md has the full tables):
- module taps (`h.{i}.attn.c_attn`, `layers.{i}.mlp.up_proj`, ...): a forward hook on the
  module of that name under the base model, which records the module's output.
- module inputs: `resid_attn` is the input of `ln_2` / `post_attention_layernorm`; the
  attention `context` is the input of `c_proj` / `o_proj`, viewed per head.
- `attn.probs` / `self_attn.probs`: HF's `output_attentions`.
- derived in PyTorch from hooked tensors, because HF has no module there: GPT-2's q/k/v
  (the c_attn output split in three, as GPT2Attention splits it); Arcee's rotated q/k (HF's
  own `apply_rotary_pos_emb` on the hooked projections and the hooked rotary cos/sin); the
  pre-mask `scores` (q k^T times the attention module's own scale, as HF's eager attention
  computes it before masking). A derived tap checks refjax against HF's formula, not HF's run.
- HF passes position ids [1, T] when the caller gives none, so `wpe` and `rotary_emb.cos/sin`
  come out [1, T, ...]; they are broadcast to the batch, as refjax computes them.
- GPT-2 calls `wte` twice when token_type_ids are given; the first call (the token ids) is `wte`.
- RoFormer: `embeddings_project` is the input of `encoder` (the projection's output, or the
  embeddings' own when embedding_size == hidden_size); `context` is the first output of
  `attention.self`, viewed per head; `intermediate_act_fn` is the `intermediate` output.
  Derived: `embed_positions.sin/cos` (the halves of `encoder.embed_positions`' output repeated
  pairwise, as `apply_rotary_position_embeddings` builds sin_pos/cos_pos), `q_rot/k_rot/v_rot`
  (HF's own `RoFormerSelfAttention.apply_rotary_position_embeddings` on the hooked projections;
  v unrotated without `rotary_value`) and the pre-mask `scores` (`q k^T / math.sqrt(H)`).
- MEGA: module outputs only, transposed from HF's sequence-first [T, B, D] to batch-first;
  `attn_weights` is HF's `attentions[i]`; without `use_normalized_ffn` HF has no `nffn`
  module and the `nffn` tap is `mega_layer`'s output again (as refjax defines it).
- I-BERT: module outputs; each module returns (tensor, scaling_factor) and the tensor is
  recorded (of `attention.self`, whose output is ((context, probs), factors), the context);
  `scores` is the *input* of `attention.self.softmax` (after the additive mask) and
  `intermediate` the output of `pre_output_act`; `pooler` only where the head has one.
- Taps with no faithful HF counterpart are not written (`NOT_RECORDED`); compare with
  `refjax diff --allow-missing`, which lists them as "only in REF".
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import numpy as np

from refjax.tooling import diff, dumps

PRODUCER = "refjax hf-taps"
MISSING = ("refjax hf-taps needs PyTorch and transformers (the `reference` extra): "
           "pip install 'refjax[reference]'")


class Recorder:
    """Tensors by tap name; the first value recorded under a name wins."""

    def __init__(self):
        self.tensors: dict[str, Any] = {}

    def put(self, name: str, value) -> None:
        if name not in self.tensors:
            self.tensors[name] = value.detach().clone()

    def output(self, module, name: str, pick: Callable = lambda o: o) -> None:
        """Record `pick(output)` of `module` under `name`."""
        module.register_forward_hook(lambda m, args, out: self.put(name, pick(out)))

    def input(self, module, name: str, pick: Callable = lambda t: t) -> None:
        """Record `pick(first positional input)` of `module` under `name`."""
        module.register_forward_hook(lambda m, args, out: self.put(name, pick(args[0])))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def hook_gpt2(base, rec: Recorder) -> Callable[[dict], None]:
    """Hooks on HF GPT2Model `base`; returns the step that derives q/k/v and scores."""
    for name in ("wte", "wpe", "drop", "ln_f"):
        rec.output(getattr(base, name), name)
    for i, block in enumerate(base.h):
        p, attn = f"h.{i}", block.attn
        rec.output(block.ln_1, f"{p}.ln_1")
        rec.output(attn.c_attn, f"{p}.attn.c_attn")
        rec.input(attn.c_proj, f"{p}.attn.context", lambda t, a=attn: t.view(*t.shape[:-1], a.num_heads, a.head_dim))
        rec.output(attn.c_proj, f"{p}.attn.c_proj")
        rec.input(block.ln_2, f"{p}.resid_attn")
        rec.output(block.ln_2, f"{p}.ln_2")
        rec.output(block.mlp.c_fc, f"{p}.mlp.c_fc")
        rec.output(block.mlp.act, f"{p}.mlp.act")
        rec.output(block.mlp.c_proj, f"{p}.mlp.c_proj")
        rec.output(block, p, _first)

    def derive(t: dict) -> None:
        import torch

        for i, block in enumerate(base.h):
            p, attn = f"h.{i}", block.attn
            # as GPT2Attention.forward: split c_attn's output, view [B, T, N, H]
            q, k, v = (x.view(*x.shape[:-1], attn.num_heads, attn.head_dim)
                       for x in t[f"{p}.attn.c_attn"].split(attn.split_size, dim=2))
            t[f"{p}.attn.q"], t[f"{p}.attn.k"], t[f"{p}.attn.v"] = q, k, v
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, N, T, H], HF's attention layout
            if attn.reorder_and_upcast_attn:  # as GPT2Attention._upcast_and_reordered_attn
                scale = 1.0
                if attn.scale_attn_weights:
                    scale /= float(v.size(-1)) ** 0.5
                if attn.scale_attn_by_inverse_layer_idx:
                    scale /= float(attn.layer_idx + 1)
                (B, N, T, H), S = q.shape, k.shape[2]
                scores = torch.baddbmm(torch.empty(B * N, T, S, dtype=torch.float32), q.reshape(-1, T, H).float(),
                                       k.transpose(-1, -2).reshape(-1, H, S).float(), beta=0, alpha=scale)
                scores = scores.reshape(B, N, T, S)
            else:  # as gpt2's eager_attention_forward, before the causal and padding masks
                scores = torch.matmul(q, k.transpose(-1, -2))
                if attn.scale_attn_weights:
                    scores = scores / torch.full([], v.size(-1) ** 0.5, dtype=scores.dtype)
                if attn.scale_attn_by_inverse_layer_idx:
                    scores = scores / float(attn.layer_idx + 1)
            t[f"{p}.attn.scores"] = scores

    return derive


def hook_arcee(base, rec: Recorder) -> Callable[[dict], None]:
    """Hooks on HF ArceeModel `base`; returns the step that derives rotated q/k and scores."""
    rec.output(base.embed_tokens, "embed_tokens")
    rec.output(base.rotary_emb, "rotary_emb.cos", lambda o: o[0])
    rec.output(base.rotary_emb, "rotary_emb.sin", lambda o: o[1])
    rec.output(base.norm, "norm")
    for i, layer in enumerate(base.layers):
        p, attn = f"layers.{i}", layer.self_attn
        rec.output(layer.input_layernorm, f"{p}.input_layernorm")
        for proj in ("q_proj", "k_proj", "v_proj"):
            rec.output(getattr(attn, proj), f"{p}.self_attn.{proj}")
        rec.input(attn.o_proj, f"{p}.self_attn.context", lambda t, a=attn: t.view(*t.shape[:-1], -1, a.head_dim))
        rec.output(attn.o_proj, f"{p}.self_attn.o_proj")
        rec.input(layer.post_attention_layernorm, f"{p}.resid_attn")
        rec.output(layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
        rec.output(layer.mlp.up_proj, f"{p}.mlp.up_proj")
        rec.output(layer.mlp.act_fn, f"{p}.mlp.act_fn")
        rec.output(layer.mlp.down_proj, f"{p}.mlp.down_proj")
        rec.output(layer, p, _first)

    def derive(t: dict) -> None:
        import torch

        hf = sys.modules[type(base).__module__]  # transformers.models.arcee.modeling_arcee
        cos, sin = t["rotary_emb.cos"], t["rotary_emb.sin"]
        for i, layer in enumerate(base.layers):
            p, attn = f"layers.{i}", layer.self_attn

            def heads(x):  # as ArceeAttention.forward: [B, T, heads*H] -> [B, heads, T, H]
                return x.view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)

            q, k = hf.apply_rotary_pos_emb(heads(t[f"{p}.self_attn.q_proj"]), heads(t[f"{p}.self_attn.k_proj"]),
                                           cos, sin)
            t[f"{p}.self_attn.q_rot"], t[f"{p}.self_attn.k_rot"] = q.transpose(1, 2), k.transpose(1, 2)
            # as Arcee's eager_attention_forward, before the mask
            t[f"{p}.self_attn.scores"] = torch.matmul(
                q, hf.repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling

    return derive


def hook_roformer(base, rec: Recorder) -> Callable[[dict], None]:
    """Hooks on HF RoFormerModel `base`; returns the step that derives sin/cos, rotated q/k/v and scores."""
    emb = base.embeddings
    for name in ("word_embeddings", "token_type_embeddings", "LayerNorm"):
        rec.output(getattr(emb, name), f"embeddings.{name}")
    # what RoFormerModel hands the encoder: embeddings_project's output, or the embeddings' own
    rec.input(base.encoder, "embeddings_project")
    rec.output(base.encoder.embed_positions, "encoder.embed_positions")  # [T, H]: [sin | cos] halves
    for i, layer in enumerate(base.encoder.layer):
        p, sa = f"encoder.layer.{i}", layer.attention.self
        for proj in ("query", "key", "value"):
            rec.output(getattr(sa, proj), f"{p}.attention.self.{proj}")
        rec.output(sa, f"{p}.attention.self.context",
                   lambda o, a=sa: o[0].view(*o[0].shape[:-1], a.num_attention_heads, a.attention_head_size))
        rec.output(layer.attention.output.dense, f"{p}.attention.output.dense")
        rec.output(layer.attention.output.LayerNorm, f"{p}.attention.output.LayerNorm")
        rec.output(layer.intermediate.dense, f"{p}.intermediate.dense")
        rec.output(layer.intermediate, f"{p}.intermediate.intermediate_act_fn")
        rec.output(layer.output.dense, f"{p}.output.dense")
        rec.output(layer, p, _first)

    def derive(t: dict) -> None:
        import math

        import torch

        table = t.pop("encoder.embed_positions")  # [T, H]
        # as RoFormerSelfAttention.apply_rotary_position_embeddings builds sin_pos / cos_pos
        sin, cos = table.chunk(2, dim=-1)
        t["encoder.embed_positions.sin"] = torch.stack([sin, sin], dim=-1).reshape_as(table)
        t["encoder.embed_positions.cos"] = torch.stack([cos, cos], dim=-1).reshape_as(table)
        sinusoidal_pos = table[None, None, :, :]  # as RoFormerEncoder.forward
        for i, layer in enumerate(base.encoder.layer):
            p, sa = f"encoder.layer.{i}.attention.self", layer.attention.self

            def heads(x):  # as RoFormerSelfAttention.forward: [B, T, D] -> [B, N, T, H]
                return x.view(x.shape[0], -1, sa.num_attention_heads, sa.attention_head_size).transpose(1, 2)

            q, k, v = (heads(t[f"{p}.{x}"]) for x in ("query", "key", "value"))
            if sa.rotary_value:
                q, k, v = sa.apply_rotary_position_embeddings(sinusoidal_pos, q, k, v)
            else:
                q, k = sa.apply_rotary_position_embeddings(sinusoidal_pos, q, k)
            t[f"{p}.q_rot"], t[f"{p}.k_rot"], t[f"{p}.v_rot"] = (x.transpose(1, 2) for x in (q, k, v))
            # as RoFormerSelfAttention.forward, before the additive mask
            t[f"{p}.scores"] = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(sa.attention_head_size)

    return derive


def hook_mega(base, rec: Recorder) -> Callable[[dict], None]:
    """Hooks on HF MegaModel `base` (layers work sequence-first [T, B, D]: their outputs are
    transposed to batch-first, as MegaModel transposes its hidden states)."""

    def batch_first(out):
        return _first(out).transpose(0, 1)

    rec.output(base.embedding_layer, "embedding_layer")
    for i, block in enumerate(base.layers):
        p = f"layers.{i}"
        rec.output(block.mega_layer.ema_gate, f"{p}.mega_layer.ema_gate", batch_first)
        rec.output(block.mega_layer, f"{p}.mega_layer", batch_first)
        # without use_normalized_ffn HF has no nffn module: the tap repeats mega_layer's output
        rec.output(block.nffn if block.nffn is not None else block.mega_layer, f"{p}.nffn", batch_first)
        rec.output(block, p, batch_first)
    return lambda t: None


def hook_ibert(base, rec: Recorder) -> Callable[[dict], None]:
    """Hooks on HF IBertModel `base`. Every I-BERT module returns (tensor, scaling_factor) (the
    factor None in float mode); the tensor is recorded. `attention.self` returns
    ((context, probs), factors): its context is recorded."""
    emb = base.embeddings
    for name in ("word_embeddings", "LayerNorm"):
        rec.output(getattr(emb, name), f"embeddings.{name}", _first)
    rec.output(emb, "embeddings", _first)
    for i, layer in enumerate(base.encoder.layer):
        p, sa = f"encoder.layer.{i}", layer.attention.self
        for proj in ("query", "key", "value"):
            rec.output(getattr(sa, f"{proj}_activation"), f"{p}.attention.self.{proj}", _first)
        rec.input(sa.softmax, f"{p}.attention.self.scores")  # q k^T / sqrt(H) + the additive mask
        rec.output(sa.softmax, f"{p}.attention.self.softmax", _first)
        rec.output(sa, f"{p}.attention.self", lambda o: o[0][0])
        for block in ("attention.output", "output"):
            module = layer.get_submodule(block)
            for name in ("dense", "ln_input_act", "LayerNorm"):
                rec.output(getattr(module, name), f"{p}.{block}.{name}", _first)
            rec.output(module, f"{p}.{block}", _first)
        rec.output(layer.pre_intermediate_act, f"{p}.pre_intermediate_act", _first)
        rec.output(layer.intermediate.dense, f"{p}.intermediate.dense", _first)
        rec.output(layer.intermediate.intermediate_act_fn, f"{p}.intermediate.intermediate_act_fn", _first)
        rec.output(layer.pre_output_act, f"{p}.intermediate", _first)
        rec.output(layer, p, _first)
    if base.pooler is not None:
        rec.output(base.pooler, "pooler")
    return lambda t: None


HOOKS = {"gpt2": hook_gpt2, "arcee": hook_arcee, "roformer": hook_roformer, "mega": hook_mega,
         "ibert": hook_ibert}
TAPS_MODULE = {"gpt2": "refjax.gpt2", "arcee": "refjax.arcee", "roformer": "refjax.roformer", "mega": "refjax.mega",
               "ibert": "refjax.ibert"}
# The tap that HF's `attentions[i]` is (recorded from output_attentions).
PROBS = {"gpt2": "h.{i}.attn.probs", "arcee": "layers.{i}.self_attn.probs",
         "roformer": "encoder.layer.{i}.attention.self.probs", "mega": "layers.{i}.mega_layer.attn_weights",
         "ibert": "encoder.layer.{i}.attention.self.softmax"}
# refjax taps HF has no faithful counterpart for: not written; `refjax diff --allow-missing`
# lists them as "only in REF" (docs/taps.md says why, per family).
NOT_RECORDED: dict[str, tuple[str, ...]] = {}
# Taps of an optional base-model module: absent (in refjax too) when the checkpoint's head builds
# the base model without it (I-BERT's pooler: IBertModel and IBertForMultipleChoice only).
OPTIONAL_MODULE = {"ibert": {"pooler": "pooler"}}


def _to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def run(checkpoint_dir: str, inputs_path: str, dtype: str = "float32") -> tuple[dict[str, np.ndarray], list[str],
                                                                               dict[str, str]]:
    """HF's outputs and taps for one checkpoint and inputs file: (tensors, order, metadata)."""
    import importlib
    import inspect

    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"{MISSING} ({e})") from None
    transformers.logging.set_verbosity_error()

    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {checkpoint_dir!r}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    family, architecture = config.get("model_type"), (config.get("architectures") or [None])[0]
    if family not in HOOKS:
        raise ValueError(f"{checkpoint_dir}: model_type {family!r} has no tap hooks (known: {', '.join(HOOKS)})")
    torch_dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[dtype]
    model = getattr(transformers, architecture).from_pretrained(
        checkpoint_dir, attn_implementation="eager", torch_dtype=torch_dtype).eval()

    raw = dumps.read_inputs(inputs_path)
    accepted = inspect.signature(model.forward).parameters
    unknown = sorted(set(raw) - set(accepted))
    if unknown:
        raise ValueError(f"{inputs_path}: {architecture}.forward takes no {', '.join(unknown)}")
    inputs = {}
    for name, array in raw.items():
        value = torch.from_numpy(np.array(array))
        inputs[name] = value.long() if not value.is_floating_point() else value.to(torch_dtype)

    base = model.base_model
    rec = Recorder()
    derive = HOOKS[family](base, rec)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True, return_dict=True)
        taps = dict(rec.tensors)
        derive(taps)
    batch = out.hidden_states[0].shape[0]
    for name in ("wpe", "rotary_emb.cos", "rotary_emb.sin"):  # HF's default position ids are [1, T]
        if name in taps:
            taps[name] = taps[name].expand(batch, *taps[name].shape[1:])
    for i, probs in enumerate(out.attentions):
        taps.setdefault(PROBS[family].replace(diff.LAYER, str(i)), probs)

    spec = importlib.import_module(TAPS_MODULE[family]).TAPS
    n_layers = len(out.attentions)
    skip = set(NOT_RECORDED.get(family, ()))
    skip |= {tap for tap, module in OPTIONAL_MODULE.get(family, {}).items() if getattr(base, module, None) is None}
    expected = [n.replace(diff.LAYER, str(i)) for n in spec if n not in skip
                for i in (range(n_layers) if diff.LAYER in n else [0])]
    missing = sorted(set(expected) - set(taps))
    if missing:
        raise RuntimeError(f"no hook recorded {', '.join(missing)}")
    tensors = {**raw, **{name: _to_numpy(taps[name]) for name in expected}}
    for i, hidden in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = _to_numpy(hidden)
    for i, probs in enumerate(out.attentions):
        tensors[f"attentions.{i}"] = _to_numpy(probs)
    last = getattr(out, "last_hidden_state", None)
    tensors["last_hidden_state"] = _to_numpy(last if last is not None else out.hidden_states[-1])
    for field in (*diff.HEAD_FIELDS[1:], "pooler_output"):  # the outputs `refjax forward` writes
        value = getattr(out, field, None)
        if value is not None:
            tensors[field] = _to_numpy(value)
    metadata = {"family": family, "architecture": architecture, "dtype": dtype, "producer": PRODUCER,
                "attn_implementation": "eager", "torch": torch.__version__, "transformers": transformers.__version__}
    return tensors, diff.model_order(tensors, spec, n_layers), metadata
