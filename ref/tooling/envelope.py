"""Tolerances for low-precision ports: how far a correct implementation drifts in a dtype.

A bf16 or fp16 port cannot meet the float32 tolerance, and a guessed one (EasyDeL settles
for atol 0.125) lets real bugs through. The envelope measures instead how far refjax
*itself* moves when it runs in the port's dtype: the same checkpoint and input through
refjax in float64 (the reference) and in the port's dtype, and per tap

    drift[name]    = max |refjax_dtype - refjax_reference|            (real positions only)
    drift_l2[name] = |refjax_dtype - refjax_reference| / |refjax_reference|   (rel L2)

A port's tensor is then ok when its own max abs and rel L2 against the reference are both
within `factor` times those (or within the plain tolerance), and the report gives the
ratio (the larger of the two) per tap: 1 is as good as refjax in that dtype, and the
first tap far above `factor` is where the port parts ways. The max catches a bug at a
few entries, the L2 a systematic one that bf16's rounding noise would hide from the max
(a GELU swapped for SiLU in one layer: max ratio 6, L2 ratio 19).

Measured on the golden GPT-2 (`gpt2/lm` with a third layer, bf16 vs float64; tests/
test_compare.py): another correct bf16 code path (the fast attention path) stays at
ratio <= 1.02 on every tensor it returns; planted bugs in layer 1 give 19 (activation
swapped for SiLU) and 26 (ln_2 epsilon 1e-5 -> 1) at their tap, 1.0 before it. Bugs
smaller than bf16's rounding do not show in bf16 at all (the exact GELU for the tanh one,
or an epsilon x100: ratio 1.0): find those in float32 first, where `refjax diff` sees
them at 1e-5. DEFAULT_FACTOR = 4 sits between. refjax in bf16 keeps softmax, norm
statistics and losses in float32 (docs/design.md, "Dtypes"); a port that rounds those to
bf16 as well drifts further and may need a larger factor: a stated choice, not a guessed atol.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from refjax.tooling import diff
from refjax.tooling.dumps import INPUT_KEYS, Dump, forward_dump

DEFAULT_FACTOR = 4.0
LOW_DTYPES = ("bfloat16", "float16", "float32")
REFERENCE_DTYPES = ("float64", "float32")


@dataclasses.dataclass(frozen=True)
class Envelope:
    dtype: str  # the port's dtype refjax ran in
    reference_dtype: str  # what the drift is measured against
    drift: dict[str, float]  # name -> max |refjax in dtype - refjax in reference_dtype| at real positions
    drift_l2: dict[str, float]  # name -> the same difference's rel L2 (|diff| / |reference|)

    def label(self) -> str:
        return f"refjax's own {self.dtype} drift from {self.reference_dtype}"

    def describe(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "reference_dtype": self.reference_dtype}


def drift_and_factor(envelope: Any, factor: float | None) -> tuple[dict[str, tuple[float, float]] | None, float]:
    """(name -> (max abs drift, rel L2 drift), or None without an envelope; the multiple
    allowed). A plain dict {name: max abs drift} judges by the max alone."""
    factor = DEFAULT_FACTOR if factor is None else factor
    if not factor > 0:
        raise ValueError(f"the envelope factor must be > 0, got {factor}")
    if envelope is None:
        return None, factor
    if isinstance(envelope, Envelope):
        return {k: (v, envelope.drift_l2.get(k, math.nan)) for k, v in envelope.drift.items()}, factor
    if not isinstance(envelope, Mapping):
        raise TypeError(f"envelope: expected an Envelope or a dict of name -> drift, got {type(envelope).__name__}")
    return {str(k): (float(v), math.nan) for k, v in envelope.items()}, factor


def _cast(params, dtype):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def run(model: Any, inputs: Mapping[str, Any], dtype: str, taps: bool = True) -> Dump:
    """refjax's forward in `dtype` as a dump (inputs, outputs, taps). `model`: a checkpoint
    directory or a loaded `Checkpoint` (its params are cast to `dtype`)."""
    import jax
    import jax.numpy as jnp

    from refjax.params.checkpoint import load_checkpoint
    from refjax.tooling.families import FAMILIES

    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("a float64 reference needs jax_enable_x64 "
                         "(jax.config.update('jax_enable_x64', True)); or use reference_dtype='float32'")
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        ckpt = load_checkpoint(model, dtype=jnp.dtype(dtype))
        params = ckpt.params
    else:
        ckpt, params = model, _cast(model.params, jnp.dtype(dtype))
    given = {k: jnp.asarray(np.asarray(v)) for k, v in inputs.items() if k in INPUT_KEYS}
    out = FAMILIES[ckpt.family].forward(params, ckpt.config, **given, output_hidden_states=True,
                                        output_attentions=True, taps=taps)
    tensors, order = forward_dump(ckpt.family, out, inputs)
    return Dump(f"refjax {dtype}", tensors, order, {"dtype": dtype, "producer": "refjax"})


def measure(model: Any, inputs: Mapping[str, Any], dtype: str = "bfloat16", reference_dtype: str = "float64",
            all_positions: bool = False) -> tuple[Dump, Envelope]:
    """Run refjax in `reference_dtype` and in `dtype` on the same input: (the reference
    dump, the envelope). Judge a port with `compare(reference, port, envelope=envelope)`."""
    if dtype not in LOW_DTYPES:
        raise ValueError(f"envelope dtype {dtype!r}: accepted {', '.join(LOW_DTYPES)}")
    if reference_dtype not in REFERENCE_DTYPES:
        raise ValueError(f"reference dtype {reference_dtype!r}: accepted {', '.join(REFERENCE_DTYPES)}")
    if "input_ids" not in inputs:
        raise ValueError("the envelope needs the port's inputs: no 'input_ids' given")
    reference = run(model, inputs, reference_dtype)
    low = run(model, inputs, dtype)
    positions = diff.positions_from(reference, low, all_positions)
    rows = diff.diff(reference, low, 0.0, 0.0, positions)
    rows = [r for r in rows if r.name not in INPUT_KEYS and not r.missing and not math.isnan(r.max_abs)]
    return reference, Envelope(dtype, reference_dtype, {r.name: r.max_abs for r in rows},
                               {r.name: r.rel_l2 for r in rows})
