"""Which forward, cache and generate each family uses: the table the CLI and verify read.

Adding a family = one entry here (its file in ref/ and params/ does the rest).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from refjax import generate as generate_lib
from refjax import arcee, gpt2
from refjax import ibert
from refjax import mega
from refjax import roformer


# `generate` decodes on per-layer weight copies when the params are at most this big (the copy
# lives while it runs): ~1.7x faster greedy decoding on CPU (BENCHMARKS.md); a bigger model
# keeps the stack unless `unstack=True` (or it is passed unstacked: `unstack_layers(params)`).
UNSTACK_MAX_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class FamilyOps:
    forward: Callable[..., Any]
    init_cache: Callable[..., Any] | None  # None: no causal LM (an encoder), generate refuses
    lm_architectures: tuple[str, ...]  # heads that produce next-token logits (can generate)
    max_positions: Callable[[Any], int | None]  # config -> size of the position table (None: RoPE, no table)
    taps: tuple[str, ...]  # tap names in dataflow order (`ref/<family>.py: TAPS`, docs/taps.md)
    takes_position_ids: bool = True  # False: HF's forward has no position_ids (positions = cache slots)
    unstack_layers: Callable[[Any], Any] | None = None  # params -> same params, layers as a tuple (ref/layers.py)
    optional_taps: tuple[str, ...] = ()  # taps of a module only some heads build (absent otherwise)
    jit: bool = False  # True: eager calls are slow (each recompiles the layer scan): tooling jits repeated calls

    def generate(self, params, config, input_ids, attention_mask=None, *, max_new_tokens: int,
                 sampling: generate_lib.Sampling = generate_lib.Sampling(), key=None, return_logits=False,
                 fast: bool = False, unstack: bool | None = None):
        """`ref.generate.generate` with this family's forward and cache, stopping at the
        config's eos id and padding finished rows with its pad id (eos when unset, as HF).

        `unstack`: decode on per-layer weight buffers (`generate`'s `unstack_layers`): faster
        on CPU, at the cost of a second copy of the layer weights while it runs. None (the
        default) = when that copy is at most UNSTACK_MAX_BYTES; False = never (params stay
        as given); True = always."""
        if self.init_cache is None:
            raise ValueError(f"{config.architecture} is an encoder without a causal LM head: generate is not "
                             "available for this family (use forward)")
        if config.architecture not in self.lm_architectures:
            raise ValueError(f"{config.architecture} is not a language model; generate needs one of: "
                             + ", ".join(self.lm_architectures))
        return generate_lib.generate(
            self.forward, self.init_cache, params, config, input_ids, attention_mask,
            max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id, key=key, max_positions=self.max_positions(config),
            return_logits=return_logits, fast=fast, takes_position_ids=self.takes_position_ids,
            unstack_layers=self.unstack_layers if self._unstack(params, unstack) else None)

    def _unstack(self, params, unstack: bool | None) -> bool:
        if self.unstack_layers is None or unstack is False:
            return False
        return unstack or sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params)) <= UNSTACK_MAX_BYTES


FAMILIES: dict[str, FamilyOps] = {
    "gpt2": FamilyOps(
        forward=gpt2.forward,
        init_cache=gpt2.init_cache,
        lm_architectures=("GPT2LMHeadModel", "GPT2DoubleHeadsModel"),
        max_positions=lambda config: config.n_positions,
        taps=gpt2.TAPS,
        unstack_layers=gpt2.unstack_layers,
    ),
    "arcee": FamilyOps(
        forward=arcee.forward,
        init_cache=arcee.init_cache,
        lm_architectures=("ArceeForCausalLM",),
        max_positions=lambda config: None,
        taps=arcee.TAPS,
        unstack_layers=arcee.unstack_layers,
    ),
    "ibert": FamilyOps(
        forward=ibert.forward,
        init_cache=None,  # an encoder: no causal LM, no cache
        lm_architectures=(),
        max_positions=lambda config: config.max_tokens,  # RoBERTa positions start after pad_token_id
        taps=ibert.TAPS,
        optional_taps=("pooler",),  # IBertModel and IBertForMultipleChoice only
        jit=True,  # quant mode's summation scans (quant.sequential_dot) in every layer
    ),
    "mega": FamilyOps(
        forward=mega.forward,
        init_cache=mega.init_cache,
        lm_architectures=("MegaForCausalLM",),  # decoders only (init_cache refuses the rest, as HF does)
        max_positions=lambda config: config.bias_positions if config.relative_positional_bias == "simple" else None,
        taps=mega.TAPS,
        takes_position_ids=False,  # HF's MEGA has no position_ids
        unstack_layers=mega.unstack_layers,
    ),
    "roformer": FamilyOps(
        forward=roformer.forward,
        init_cache=roformer.init_cache,
        lm_architectures=("RoFormerForCausalLM",),  # needs config.is_decoder (forward refuses a cache otherwise)
        max_positions=lambda config: config.max_position_embeddings,
        taps=roformer.TAPS,
        takes_position_ids=False,  # HF's RoFormer has no position_ids: positions are the cache slots
        unstack_layers=roformer.unstack_layers,
    ),
}
