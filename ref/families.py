"""Which forward, cache and generate each family uses: the table the CLI and verify read.

Adding a family = one entry here (its file in ref/ and params/ does the rest).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ref import generate as generate_lib
from ref import arcee, gpt2


@dataclasses.dataclass(frozen=True)
class FamilyOps:
    forward: Callable[..., Any]
    init_cache: Callable[..., Any]
    lm_architectures: tuple[str, ...]  # heads that produce next-token logits (can generate)
    max_positions: Callable[[Any], int | None]  # config -> size of the position table (None: RoPE, no table)
    taps: tuple[str, ...]  # tap names in dataflow order (`ref/<family>.py: TAPS`, docs/taps.md)
    takes_position_ids: bool = True  # False: HF's forward has no position_ids (positions = cache slots)

    def generate(self, params, config, input_ids, attention_mask=None, *, max_new_tokens: int,
                 sampling: generate_lib.Sampling = generate_lib.Sampling(), key=None, return_logits=False,
                 fast: bool = False):
        """`ref.generate.generate` with this family's forward and cache, stopping at the
        config's eos id and padding finished rows with its pad id (eos when unset, as HF)."""
        if config.architecture not in self.lm_architectures:
            raise ValueError(f"{config.architecture} is not a language model; generate needs one of: "
                             + ", ".join(self.lm_architectures))
        return generate_lib.generate(
            self.forward, self.init_cache, params, config, input_ids, attention_mask,
            max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id, key=key, max_positions=self.max_positions(config),
            return_logits=return_logits, fast=fast, takes_position_ids=self.takes_position_ids)


FAMILIES: dict[str, FamilyOps] = {
    "gpt2": FamilyOps(
        forward=gpt2.forward,
        init_cache=gpt2.init_cache,
        lm_architectures=("GPT2LMHeadModel", "GPT2DoubleHeadsModel"),
        max_positions=lambda config: config.n_positions,
        taps=gpt2.TAPS,
    ),
    "arcee": FamilyOps(
        forward=arcee.forward,
        init_cache=arcee.init_cache,
        lm_architectures=("ArceeForCausalLM",),
        max_positions=lambda config: None,
        taps=arcee.TAPS,
    ),
}
