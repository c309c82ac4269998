"""Compare two tensor dumps in model order and name the first op where they part ways.

The rows behind `refjax diff` and `refjax.compare` (ref/tooling/compare.py builds the
report from them, ref/tooling/dumps.py reads the files). A dump is a set of named tensors:
`refjax forward --taps` writes one, `refjax hf-taps` writes one from HF PyTorch, and any
other implementation can write one with its own names (`--map` renames them onto ours).
This module holds the layout of a refjax dump (names, model order), the renaming, and the
comparison of one tensor, as functions that return rows.

Comparison of one tensor (all in float64, whatever the stored dtypes), over the entries
at real positions (see `Positions`):
  max abs = max |ref - other|, and where (`at`, an index into REF's shape)
  max rel = max abs / max |ref|      rel L2 = |ref - other| / |ref|
  1-cos   = 1 - <ref, other> / (|ref| |other|), as |ref/|ref| - other/|other||^2 / 2 (no
            cancellation: it reads 1e-12 where the cosine itself prints 1.0000000)
  ok      when max abs <= atol + rtol * max |ref|   (tolerance scaled by the tensor's
          largest magnitude, as `refjax verify` does, not element by element: a small
          entry computed from large terms carries the rounding error of the large terms);
          with an envelope, also when max abs and rel L2 are both within factor times refjax's
          own drift in the port's dtype (ref/tooling/envelope.py)
Non-finite entries (-inf scores, NaN) must sit at the same places with the same values;
the finite rest is compared. A dtype difference is noted and the values still compared
(a bf16 port is compared against an fp32 reference at a looser tolerance). A shape
difference with the same number of entries is noted and the tensors compared in flat
(row-major) order: a dump without the batch axis still compares, and a transposed layout
shows up as a value difference. Different sizes cannot be compared: status SHAPE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from refjax.probe import LAYER, stacked
from refjax.tooling.dumps import INPUT_KEYS, Dump

# Forward outputs after the final norm, in the order a dump lists them (HF field names).
HEAD_FIELDS = ("last_hidden_state", "logits", "loss", "mc_logits", "mc_loss", "start_logits", "end_logits")
# The output fields `refjax forward` writes (HF names).
OUTPUT_FIELDS = ("logits", "loss", "mc_logits", "mc_loss", "start_logits", "end_logits", "last_hidden_state",
                 "pooler_output")

# Row statuses. DIFF and SHAPE are divergences; the two "only" statuses are missing names.
OK, DIFF, SHAPE, ONLY_REF, ONLY_OTHER = "ok", "DIFF", "SHAPE", "only REF", "only OTHER"


# --------------------------------------------------------------------------------------
# What a refjax dump holds, and in which order
# --------------------------------------------------------------------------------------


def expand_taps(taps: Mapping[str, Any], spec: Sequence[str], n_layers: int,
                optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """forward's taps dict (per-layer taps stacked [L, ...]) -> one array per layer and op,
    named as `spec` (a family's TAPS) says: "h.{i}.attn.q" -> "h.0.attn.q", "h.1.attn.q", ...
    Names in `optional` may be absent (a module only some heads build, e.g. I-BERT's pooler)."""
    expected = {stacked(n) for n in spec}
    if not set(taps) <= expected or expected - set(taps) - {stacked(n) for n in optional}:
        # the family file and its TAPS table disagree: a refjax bug
        raise RuntimeError(f"taps and TAPS disagree: produced but not listed {sorted(set(taps) - expected)}, "
                           f"listed but not produced {sorted(expected - set(taps))}")
    out = {}
    for name in spec:
        if stacked(name) not in taps:
            continue
        value = np.asarray(taps[stacked(name)])
        if LAYER in name:
            for i in range(n_layers):
                out[name.replace(LAYER, str(i))] = value[i]
        else:
            out[name] = value
    return out


def model_order(names: Iterable[str], spec: Sequence[str] = (), n_layers: int = 0) -> list[str]:
    """The dataflow order of a forward dump's names: the inputs, taps before the layers (embeddings),
    then per layer `hidden_states.{i}` (the layer's input), the layer's taps and
    `attentions.{i}`, then the taps after the layers (final norm), `hidden_states.{L}`,
    `last_hidden_state` and the head outputs. Each output comes after the tap that
    computes it, so the first divergence is always the op itself. Unknown names go last,
    naturally sorted."""
    names = set(names)
    per_layer = [n for n in spec if LAYER in n]
    first = spec.index(per_layer[0]) if per_layer else len(spec)
    order = [*INPUT_KEYS, *(n for n in spec[:first] if LAYER not in n)]
    for i in range(n_layers):
        order += [f"hidden_states.{i}", *(n.replace(LAYER, str(i)) for n in per_layer), f"attentions.{i}"]
    order += [n for n in spec[first:] if LAYER not in n]
    order += [f"hidden_states.{n_layers}", *HEAD_FIELDS]
    listed = set(order)
    return [n for n in order if n in names] + natural_sorted(names - listed)


def natural_key(name: str) -> tuple:
    """Sort key that reads digit runs as numbers: "h.2.ln_1" < "h.10.ln_1"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)


# --------------------------------------------------------------------------------------
# Renaming another tool's names
# --------------------------------------------------------------------------------------


def read_map(path: str) -> dict[str, str]:
    """A --map file: a JSON object {OTHER's name: our name}. A key may hold `{i}` (digits,
    the layer index), which the value repeats: {"blk.{i}.attn_q": "layers.{i}.self_attn.q_proj"}."""
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"map file {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"map file {path!r} is not valid JSON ({e})") from None
    return check_map(mapping, f"map file {path!r}")


def check_map(mapping: Any, label: str = "names") -> dict[str, str]:
    """A name map ({their name: our name}, `{i}` for a layer index) checked, or ValueError."""
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in mapping.items()):
        raise ValueError(f"{label} must be a JSON object of names: {{\"their name\": \"our name\", ...}}")
    for key, value in mapping.items():
        if key.count(LAYER) > 1:
            raise ValueError(f"{label}: key {key!r} has more than one {LAYER}")
        if LAYER in value and LAYER not in key:
            raise ValueError(f"{label}: {value!r} uses {LAYER} but its key {key!r} does not")
    return dict(mapping)


def _map_name(name: str, mapping: Mapping[str, str],
              patterns: list[tuple[re.Pattern, str, str]]) -> tuple[str, str | None]:
    """(new name, the map key that matched or None)."""
    if name in mapping:
        return mapping[name], name
    for regex, value, key in patterns:
        match = regex.fullmatch(name)
        if match:
            return value.replace(LAYER, match.group("i")), key
    return name, None


def rename(dump: Dump, mapping: Mapping[str, str]) -> tuple[Dump, list[str]]:
    """Apply a --map to OTHER's names (and its order). Returns the renamed dump and the map
    keys that matched nothing. Two names landing on one is an error."""
    patterns = [(re.compile(re.escape(k).replace(re.escape(LAYER), r"(?P<i>\d+)")), v, k)
                for k, v in mapping.items() if LAYER in k]
    used, renamed, source = set(), {}, {}
    for name, value in dump.tensors.items():
        new, key = _map_name(name, mapping, patterns)
        if key is not None:
            used.add(key)
        if new in renamed:
            raise ValueError(f"--map: {source[new]!r} and {name!r} in {dump.path} both become {new!r}")
        renamed[new], source[new] = value, name
    order = None if dump.order is None else [_map_name(n, mapping, patterns)[0] for n in dump.order]
    return dataclasses.replace(dump, tensors=renamed, order=order), [k for k in mapping if k not in used]


# --------------------------------------------------------------------------------------
# Which entries are real tokens
# --------------------------------------------------------------------------------------

# [B, T] tensors that are per token (other 2-D outputs, e.g. sequence-classification logits
# [B, labels], are per sequence: compared whole).
TOKEN_VECTORS = ("start_logits", "end_logits")


@dataclasses.dataclass(frozen=True)
class Positions:
    """Which (batch, position) entries are compared. A padded position's values are
    implementation-defined (HF says so too: what a pad query attends to, what a pad key
    holds), so by default only real positions count: `mask` is the dump's attention_mask
    ([B, T], or [B, C, T] for multiple choice), None to compare everything.

    A tensor is matched to the mask by its shape: [B, T, ...] (hidden states, taps, logits;
    [B, C, T, ...] too) keeps its real rows; [B, N, T, T] (scores, attention maps) keeps
    real queries x real keys; [B, T] outputs named in TOKEN_VECTORS keep real positions;
    anything else (per-sequence outputs, the loss, the inputs) is compared whole."""

    mask: np.ndarray | None
    source: str  # said in the report: where the mask came from
    everywhere: bool = False  # compare padded positions too (the mask then only locates errors)

    def keep(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(a boolean array of `shape`, True where an entry is compared; the axes that index
        (batch, position)), or None to compare all of it."""
        if self.mask is None or name in INPUT_KEYS:
            return None
        mask = self.mask
        flat = mask.reshape(-1, mask.shape[-1])  # [B, T] (multiple choice: [B * C, T])
        (B, T), ndim = flat.shape, len(shape)
        if ndim == 4 and shape[0] == B and shape[2] == shape[3] == T:  # [B, N, T, S]
            keep, axes = flat[:, None, :, None] & flat[:, None, None, :], (0, 2)
        elif mask.ndim == 3 and tuple(shape[:3]) == mask.shape and ndim >= 4:  # [B, C, T, ...]
            keep, axes = mask.reshape(mask.shape + (1,) * (ndim - 3)), (0, 2)
        elif tuple(shape[:2]) == (B, T) and (ndim >= 3 or name in TOKEN_VECTORS):  # [B, T, ...]
            keep, axes = flat.reshape((B, T) + (1,) * (ndim - 2)), (0, 1)
        else:
            return None
        return np.broadcast_to(True if self.everywhere else keep, shape), axes

    @property
    def counts(self) -> tuple[int, int] | None:
        """(real positions, all positions), or None when everything is compared."""
        return None if self.mask is None or self.everywhere else (int(self.mask.sum()), int(self.mask.size))


ALL_POSITIONS = Positions(None, "every position")


def positions_from(ref: Dump, other: Dump, all_positions: bool = False,
                   attention_mask: Any = None) -> Positions:
    """The positions to compare: an explicit `attention_mask`, else REF's, else OTHER's;
    every position with `all_positions` or when neither dump has a mask."""
    for mask, source in ((attention_mask, "the attention_mask given"),
                         (ref.tensors.get("attention_mask"), "REF's attention_mask"),
                         (other.tensors.get("attention_mask"), "OTHER's attention_mask")):
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim < 2:
                raise ValueError(f"{source} must be [batch, seq] (or [batch, choices, seq]), got shape "
                                 f"{list(mask.shape)}")
            if all_positions:
                return Positions(mask != 0, "every position (padding included, as asked)", everywhere=True)
            return Positions(mask != 0, source)
    return Positions(None, "every position (no attention_mask in either dump)")


# --------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    shape: str  # "[4, 12, 16]", or "[4, 12, 16] vs [48, 16]"
    max_abs: float  # NaN when not compared
    max_rel: float
    cosine: float
    status: str  # OK, DIFF, SHAPE, ONLY_REF, ONLY_OTHER
    note: str = ""
    tolerance: float = math.nan  # atol + rtol * max|ref| (with an envelope: at least factor * drift)
    rel_l2: float = math.nan  # |ref - other| / |ref|
    one_minus_cos: float = math.nan  # 1 - cosine, computed without cancellation
    at: tuple[int, ...] | None = None  # index (into REF's shape) of the largest |ref - other|
    position: tuple[int, int] | None = None  # (batch, position) of `at`, for per-token tensors
    real_only: bool = False  # True: only entries at real positions were compared
    drift: float = math.nan  # envelope: max abs of refjax in the low dtype vs the reference dtype
    ratio: float = math.nan  # envelope: the larger of max abs / drift and rel L2 / refjax's rel L2

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def diverged(self) -> bool:
        return self.status in (DIFF, SHAPE)

    @property
    def missing(self) -> bool:
        return self.status in (ONLY_REF, ONLY_OTHER)


def _shape(a) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def _direction_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine, 1 - cosine) of two float64 vectors; 1 - cos = |a/|a| - b/|b||^2 / 2."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        same = na == nb  # both zero: the same direction; one zero: none in common
        return (1.0, 0.0) if same else (0.0, 1.0)
    gap = float(np.sum((a / na - b / nb) ** 2)) / 2
    return float(np.dot(a, b)) / (na * nb), gap


def _ratio(error: float, drift: float) -> float:
    return error / drift if drift > 0 else (0.0 if error == 0 else math.inf)


def compare_tensor(name: str, ref: Any, other: Any, rtol: float, atol: float,
                   positions: Positions = ALL_POSITIONS, drift: tuple[float, float] | None = None,
                   factor: float = 1.0) -> Row:
    """One row: `ref` against `other` (see the module docstring for the rule). `drift`,
    when given, is this tensor's envelope (max abs, rel L2 of refjax's own drift): the
    tensor is then also ok when both its max abs and its rel L2 are within `factor` times
    those (`ratio` is the larger of the two ratios)."""
    ref, other = np.asarray(ref), np.asarray(other)
    notes = []
    shape = _shape(ref)
    if ref.shape != other.shape:
        shape = f"{_shape(ref)} vs {_shape(other)}"
        if ref.size != other.size:
            return Row(name, shape, math.nan, math.nan, math.nan, SHAPE, "different sizes: not compared")
        notes.append("compared in flat order")
    if ref.dtype != other.dtype:
        notes.append(f"dtype {ref.dtype} vs {other.dtype}")
    a, b = ref.astype(np.float64).reshape(-1), other.astype(np.float64).reshape(-1)
    keep = positions.keep(name, ref.shape)
    chosen = np.ones(a.shape, bool) if keep is None else keep[0].reshape(-1)
    finite = np.isfinite(a) & np.isfinite(b)
    same_nonfinite = (a == b) | (np.isnan(a) & np.isnan(b))
    bad = int(np.count_nonzero(chosen & ~finite & ~same_nonfinite))
    n_nonfinite = int(np.count_nonzero(chosen & ~finite))
    if n_nonfinite:
        notes.append(f"{n_nonfinite} non-finite entries" + (f", {bad} of them differ" if bad else ", equal"))
    used = np.flatnonzero(chosen & finite)
    a, b = a[used], b[used]
    err = np.abs(a - b)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    max_abs = float(np.max(err)) if a.size else 0.0
    at = tuple(int(i) for i in np.unravel_index(used[np.argmax(err)], ref.shape)) if max_abs > 0 else None
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    norm = float(np.linalg.norm(a))
    gap = float(np.linalg.norm(a - b))
    rel_l2 = gap / norm if norm > 0 else (0.0 if gap == 0 else math.inf)
    cosine, one_minus_cos = _direction_gap(a, b)
    tolerance, ratio = atol + rtol * scale, math.nan
    ok = max_abs <= tolerance
    if drift is not None:
        ratio = max(_ratio(max_abs, drift[0]), _ratio(rel_l2, drift[1]) if not math.isnan(drift[1]) else 0.0)
        ok = ok or ratio <= factor
        tolerance = max(tolerance, factor * drift[0])
    position = None if keep is None or at is None else (at[keep[1][0]], at[keep[1][1]])
    real_only = keep is not None and not positions.everywhere
    return Row(name, shape, max_abs, max_rel, cosine, OK if ok and bad == 0 else DIFF, "; ".join(notes), tolerance,
               rel_l2, one_minus_cos, at, position, real_only, math.nan if drift is None else drift[0], ratio)


def comparison_order(ref: Dump, other: Dump) -> tuple[list[str], str]:
    """Every name of either dump, in REF's recorded order (else OTHER's, else natural
    order); names the order does not list go last, naturally sorted. Also says which."""
    names = set(ref.tensors) | set(other.tensors)
    for dump, label in ((ref, "REF"), (other, "OTHER")):
        if dump.order is not None:
            listed = [n for n in dict.fromkeys(dump.order) if n in names]
            return listed + natural_sorted(names - set(listed)), f"order from {label}'s metadata"
    return natural_sorted(names), "natural order (neither dump records an order)"


def diff(ref: Dump, other: Dump, rtol: float, atol: float, positions: Positions = ALL_POSITIONS,
         drift: Mapping[str, tuple[float, float]] | None = None, factor: float = 1.0) -> list[Row]:
    """One row per name of either dump, in comparison order. An input (INPUT_KEYS) present
    on one side only is no row: a port need not dump what it was given. `drift`: the
    envelope (name -> (max abs, rel L2)); names it lacks keep the plain tolerance."""
    rows = []
    for name in comparison_order(ref, other)[0]:
        if name in INPUT_KEYS and not (name in ref.tensors and name in other.tensors):
            continue
        if name not in other.tensors:
            rows.append(Row(name, _shape(np.asarray(ref.tensors[name])), math.nan, math.nan, math.nan, ONLY_REF))
        elif name not in ref.tensors:
            rows.append(Row(name, _shape(np.asarray(other.tensors[name])), math.nan, math.nan, math.nan, ONLY_OTHER))
        else:
            rows.append(compare_tensor(name, ref.tensors[name], other.tensors[name], rtol, atol, positions,
                                       None if drift is None else drift.get(name), factor))
    return rows


def first_divergence(rows: Sequence[Row]) -> Row | None:
    """The first row, in model order, whose values differ (DIFF) or cannot be compared (SHAPE)."""
    return next((r for r in rows if r.diverged), None)
