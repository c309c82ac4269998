"""Named sites of one forward call: taps to read, patches to replace, dropout to apply.

A family's math core passes each intermediate through a `Probe`:

    a = probe("mlp.act", act(h))              # recorded when taps=True; replaced when patched
    y = probe.dropout("mlp.dropout", y, rate)  # HF's nn.Dropout: identity unless train=True

so one line names the point where HF has a module (or an op a hook can see), and the
same name serves reading (`taps=True`), intervention (`patch={name: fn}`) and HF's
training mode (`train=True, key=...`). A Probe lives for one call and carries no state
across calls: `forward` builds it from its arguments, the layer scan builds one per
layer (`probe.layer(i)`) whose records come back stacked [L, ...] like every scan output.

Names: per-layer sites are `"<stack>.{i}.<name>"` ("h.{i}.mlp.act"); a patch or mask may
name one layer ("h.3.mlp.act") or every layer ("h.{i}.mlp.act"). A patch value is a
function `fn(value) -> value` or an array put in the value's place (for "{i}" names an
array [L, ...] gives each layer its slice). Dropout masks, when given, are keyed the same
way and hold the keep-mask (1 keep, 0 drop) as HF's `nn.Dropout` draws it; without masks
they are drawn from `key`, folded with the site's name and the layer index. With
`taps=True` a training call also records each keep-mask it used under its site's name
(under "<site>.keep" when a tap has that name too: GPT-2's "drop" is both), so one call's
masks can be replayed exactly (in refjax, or injected into HF's modules).
"""

from __future__ import annotations

import difflib
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

LAYER = "{i}"  # the layer-index placeholder of per-layer names


def _site_id(name: str) -> int:
    """A stable 31-bit number per site name (folded into the PRNG key; Python's hash() is salted)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class Probe:
    """Taps, patches and dropout of one call. `prefix` is the stack's name ("h") for a layer
    probe; `index` its (possibly traced) layer index; `names` every site name the family
    has, for error messages."""

    def __init__(self, *, taps: bool = False, patch: Mapping[str, Any] | None = None, train: bool = False,
                 key: jax.Array | None = None, masks: Mapping[str, Any] | None = None, prefix: str = "",
                 index: jax.Array | None = None):
        self.taps = taps
        self.patch = dict(patch or {})
        self.train = train
        self.key = key
        self.masks = dict(masks or {})
        self.prefix = prefix
        self.index = index
        self.recorded: dict[str, jax.Array] = {}

    # -- building -------------------------------------------------------------------------

    @classmethod
    def for_call(cls, family: str, site_names: Sequence[str], n_layers: int, *, taps: bool = False,
                 patch: Mapping[str, Any] | None = None, train: bool = False, key: jax.Array | None = None,
                 masks: Mapping[str, Any] | None = None) -> "Probe":
        """The probe of one forward call; unknown patch or mask names are errors that list
        the nearest site names. `site_names`: the family's TAPS and dropout sites."""
        for what, given in (("patch", patch or {}), ("dropout mask", masks or {})):
            for name in given:
                check_site(family, name, site_names, n_layers, what)
        if train and key is None and not masks:
            raise ValueError("train=True needs a PRNG key (key=jax.random.key(0)) or explicit dropout masks")
        return cls(taps=taps, patch=patch, train=train, key=key, masks=masks)

    def layer(self, prefix: str, index: jax.Array) -> "Probe":
        """The probe of one layer of the stack `prefix` ("h", "layers", "encoder.layer")."""
        return Probe(taps=self.taps, patch=self.patch, train=self.train, key=self.key, masks=self.masks,
                     prefix=prefix, index=index)

    # -- names ----------------------------------------------------------------------------

    def _matches(self, table: Mapping[str, Any], name: str):
        """Entries of `table` for `name` here: (value, layer number or None for every layer)."""
        if not self.prefix:
            return [(table[name], None)] if name in table else []
        found = []
        every = f"{self.prefix}.{LAYER}.{name}" if name else f"{self.prefix}.{LAYER}"
        if every in table:
            found.append((table[every], LAYER))
        head = f"{self.prefix}."
        tail = f".{name}" if name else ""
        for key, value in table.items():
            if key.startswith(head) and key.endswith(tail):
                middle = key[len(head):len(key) - len(tail)] if tail else key[len(head):]
                if middle.isdigit():
                    found.append((value, int(middle)))
        return found

    # -- taps and patches -----------------------------------------------------------------

    def __call__(self, name: str, value: jax.Array) -> jax.Array:
        """Record `value` as tap `name` (after any patch) and return what flows on."""
        for replacement, layer in self._matches(self.patch, name):
            value = self._patched(value, replacement, layer)
        if self.taps:
            earlier = self.recorded.get(name)
            if earlier is not None and earlier.dtype == bool and value.dtype != bool:
                # a dropout site of the same name (GPT-2's "drop") recorded its keep-mask here
                self.recorded[f"{name}.keep"] = self.recorded.pop(name)
            self.recorded[name] = value
        return value

    def _patched(self, value, replacement, layer):
        if callable(replacement):
            new = replacement(value)
        else:
            new = jnp.asarray(replacement)
            if layer == LAYER and new.ndim == value.ndim + 1:  # [L, ...]: this layer's slice
                new = new[self.index]
        new = jnp.broadcast_to(jnp.asarray(new, value.dtype), value.shape)
        if layer is None or layer == LAYER:
            return new
        return jnp.where(self.index == layer, new, value)

    # -- dropout ----------------------------------------------------------------------------

    def dropout(self, site: str, x: jax.Array, rate: float, shape: Sequence[int] | None = None) -> jax.Array:
        """HF's `nn.Dropout(rate)` at `site`: in training, keep each entry with probability
        1 - rate and scale the kept ones by 1 / (1 - rate); identity otherwise (free).
        `shape`: the keep-mask's shape when it broadcasts over x (same rank, 1 where one
        draw covers the axis: MEGA's feature dropout drops whole channels, [B, 1, D])."""
        if not self.train or rate == 0.0:
            return x
        shape = x.shape if shape is None else tuple(shape)
        given = self._matches(self.masks, site)
        if any(layer in (None, LAYER) for _, layer in given):  # a mask for this site in every layer
            keep = self._mask_value(given, shape)
        else:  # drawn, but where a mask names this layer ("h.3.mlp.dropout")
            if self.key is None:
                raise ValueError(f"dropout masks name only some layers of {self.prefix}.{LAYER}.{site}: the others "
                                 f"need a key (key=...) or a mask for every layer ({self.prefix}.{LAYER}.{site})")
            key = jax.random.fold_in(self.key, _site_id(f"{self.prefix}.{site}" if self.prefix else site))
            if self.index is not None:
                key = jax.random.fold_in(key, self.index)
            keep = self._mask_value(given, shape, jax.random.bernoulli(key, 1.0 - rate, shape))
        if self.taps:  # with taps=True the keep-mask is recorded under the site's name
            self.recorded[site] = keep
        scale = jnp.asarray(1.0 / (1.0 - rate), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))

    def _mask_value(self, given, shape, keep=None):
        """The keep-mask from the masks given (layer-specific ones override `keep` in their layer)."""
        for value, layer in given:
            m = jnp.asarray(value)
            if layer == LAYER and m.ndim == len(shape) + 1:
                m = m[self.index]
            m = jnp.broadcast_to(m.astype(bool), shape)
            keep = m if keep is None or layer in (None, LAYER) else jnp.where(self.index == layer, m, keep)
        return keep


def check_site(family: str, name: str, site_names: Sequence[str], n_layers: int, what: str = "patch") -> None:
    """`name` must be one of the family's sites: exact, per layer ("h.3.mlp.act", 0 <= 3 < L)
    or every layer ("h.{i}.mlp.act"). Otherwise a ValueError listing the nearest names."""
    if name in site_names:
        return
    for pattern in site_names:
        if LAYER in pattern:
            head, tail = pattern.split(LAYER)
            if name.startswith(head) and name.endswith(tail):
                middle = name[len(head):len(name) - len(tail)] if tail else name[len(head):]
                if middle.isdigit() and int(middle) < n_layers:
                    return
                if middle.isdigit():
                    raise ValueError(f"{what} {name!r}: layer {middle} does not exist ({family} has "
                                     f"{n_layers} layers)")
    expanded = [p.replace(LAYER, str(i)) for p in site_names for i in range(max(n_layers, 1))] + list(site_names)
    near = difflib.get_close_matches(name, expanded, n=4, cutoff=0.5)
    hint = f"; nearest: {', '.join(near)}" if near else ""
    raise ValueError(f"{what} {name!r} is not a {family} site{hint} (the full list: refjax.{family}.TAPS)")


def stacked(name: str) -> str:
    """A site's key in a taps dict: "h.{i}.mlp.dropout" -> "h.mlp.dropout" (stacked [L, ...])."""
    return name.replace("." + LAYER, "")


def masks_from_taps(taps: Mapping[str, jax.Array], sites: Sequence[str]) -> dict[str, jax.Array]:
    """The keep-masks a training call recorded (taps=True), keyed as `dropout_masks=` takes
    them ("h.{i}.mlp.dropout": [L, ...]): replaying them reproduces that call exactly."""
    found = {}
    for site in sites:
        for key in (f"{stacked(site)}.keep", stacked(site)):  # ".keep": the site is also a tap's name
            if key in taps and taps[key].dtype == bool:
                found[site] = taps[key]
                break
    return found


# The probe of a plain call: records nothing, patches nothing, no dropout (it never changes).
OFF = Probe()
