"""Compare two tensor dumps in model order and name the first op where they part ways.

Used by `refjax diff REF.safetensors OTHER.safetensors` (ref/cli.py). A dump is a
safetensors file of named tensors: `refjax forward --taps` writes one, `tools/hf_taps.py`
writes one from HF PyTorch, and any other implementation can write one with its own
names (`--map` renames them onto ours). Safetensors sorts keys, so the model order
travels in the metadata: `"order"` is a JSON list of the names in the order they are
computed. This module holds both halves: the layout of a refjax dump (names, order) and
the comparison, as functions that return rows; ref/cli.py prints them.

Comparison of one tensor (all in float64, whatever the stored dtypes):
  max abs = max |ref - other|          max rel = max abs / max |ref|
  cosine  = <ref, other> / (|ref| |other|)
  ok      when max abs <= atol + rtol * max |ref|   (tolerance scaled by the tensor's
          largest magnitude, as `refjax verify` does, not element by element: a small
          entry computed from large terms carries the rounding error of the large terms)
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

from refjax.params import io

# Forward outputs after the final norm, in the order a dump lists them (HF field names).
HEAD_FIELDS = ("last_hidden_state", "logits", "loss", "mc_logits", "mc_loss", "start_logits", "end_logits")
LAYER = "{i}"  # the layer-index placeholder in a family's TAPS names ("h.{i}.attn.q")

# Row statuses. DIFF and SHAPE are divergences; the two "only" statuses are missing names.
OK, DIFF, SHAPE, ONLY_REF, ONLY_OTHER = "ok", "DIFF", "SHAPE", "only REF", "only OTHER"


# --------------------------------------------------------------------------------------
# What a refjax dump holds, and in which order
# --------------------------------------------------------------------------------------


def stacked_name(name: str) -> str:
    """The key a per-layer tap has in forward's taps dict: "h.{i}.attn.q" -> "h.attn.q",
    "h.{i}" -> "h"."""
    return name.replace("." + LAYER, "")


def expand_taps(taps: Mapping[str, Any], spec: Sequence[str], n_layers: int,
                optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """forward's taps dict (per-layer taps stacked [L, ...]) -> one array per layer and op,
    named as `spec` (a family's TAPS) says: "h.{i}.attn.q" -> "h.0.attn.q", "h.1.attn.q", ...
    Names in `optional` may be absent (a module only some heads build, e.g. I-BERT's pooler)."""
    expected = {stacked_name(n) for n in spec}
    if not set(taps) <= expected or expected - set(taps) - {stacked_name(n) for n in optional}:
        # the family file and its TAPS table disagree: a refjax bug
        raise RuntimeError(f"taps and TAPS disagree: produced but not listed {sorted(set(taps) - expected)}, "
                           f"listed but not produced {sorted(expected - set(taps))}")
    out = {}
    for name in spec:
        if stacked_name(name) not in taps:
            continue
        value = np.asarray(taps[stacked_name(name)])
        if LAYER in name:
            for i in range(n_layers):
                out[name.replace(LAYER, str(i))] = value[i]
        else:
            out[name] = value
    return out


def model_order(names: Iterable[str], spec: Sequence[str] = (), n_layers: int = 0) -> list[str]:
    """The dataflow order of a forward dump's names: taps before the layers (embeddings),
    then per layer `hidden_states.{i}` (the layer's input), the layer's taps and
    `attentions.{i}`, then the taps after the layers (final norm), `hidden_states.{L}`,
    `last_hidden_state` and the head outputs. Each output comes after the tap that
    computes it, so the first divergence is always the op itself. Unknown names go last,
    naturally sorted."""
    names = set(names)
    per_layer = [n for n in spec if LAYER in n]
    first = spec.index(per_layer[0]) if per_layer else len(spec)
    order = [n for n in spec[:first] if LAYER not in n]
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
# Reading dumps and renaming another tool's names
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dump:
    path: str
    tensors: dict[str, Any]  # name -> numpy array (memory-mapped)
    order: list[str] | None  # the "order" metadata, when the file has it


def read_dump(path: str) -> Dump:
    """A safetensors dump and its "order" metadata. Missing file: FileNotFoundError; not a
    safetensors file, or an "order" that is not a JSON list of names: ValueError."""
    tensors, metadata = io.read_safetensors(path)
    order = None
    if "order" in metadata:
        try:
            order = json.loads(metadata["order"])
        except json.JSONDecodeError:
            order = None
        if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
            raise ValueError(f"{path}: metadata 'order' must be a JSON list of tensor names")
    return Dump(str(path), dict(tensors), order)


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
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"map file {path!r} must be a JSON object of names: {{\"their name\": \"our name\", ...}}")
    for key, value in mapping.items():
        if key.count(LAYER) > 1:
            raise ValueError(f"map file {path!r}: key {key!r} has more than one {LAYER}")
        if LAYER in value and LAYER not in key:
            raise ValueError(f"map file {path!r}: {value!r} uses {LAYER} but its key {key!r} does not")
    return mapping


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
    return Dump(dump.path, renamed, order), [k for k in mapping if k not in used]


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
    tolerance: float = math.nan  # atol + rtol * max|ref|

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


def compare(name: str, ref: Any, other: Any, rtol: float, atol: float) -> Row:
    """One row: `ref` against `other` (see the module docstring for the rule)."""
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
    finite = np.isfinite(a) & np.isfinite(b)
    same_nonfinite = (a == b) | (np.isnan(a) & np.isnan(b))
    bad = int(np.count_nonzero(~finite & ~same_nonfinite))
    if not np.all(finite):
        notes.append(f"{int(np.count_nonzero(~finite))} non-finite entries" +
                     (f", {bad} of them differ" if bad else ", equal"))
    a, b = a[finite], b[finite]
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if norms > 0:
        cosine = float(np.dot(a, b)) / norms
    else:
        cosine = 1.0 if not (np.any(a) or np.any(b)) else 0.0
    tolerance = atol + rtol * scale
    ok = max_abs <= tolerance and bad == 0
    return Row(name, shape, max_abs, max_rel, cosine, OK if ok else DIFF, "; ".join(notes), tolerance)


def comparison_order(ref: Dump, other: Dump) -> tuple[list[str], str]:
    """Every name of either dump, in REF's recorded order (else OTHER's, else natural
    order); names the order does not list go last, naturally sorted. Also says which."""
    names = set(ref.tensors) | set(other.tensors)
    for dump, label in ((ref, "REF"), (other, "OTHER")):
        if dump.order is not None:
            listed = [n for n in dict.fromkeys(dump.order) if n in names]
            return listed + natural_sorted(names - set(listed)), f"order from {label}'s metadata"
    return natural_sorted(names), "natural order (neither file records an order)"


def diff(ref: Dump, other: Dump, rtol: float, atol: float) -> list[Row]:
    """One row per name of either dump, in comparison order."""
    rows = []
    for name in comparison_order(ref, other)[0]:
        if name not in other.tensors:
            rows.append(Row(name, _shape(np.asarray(ref.tensors[name])), math.nan, math.nan, math.nan, ONLY_REF))
        elif name not in ref.tensors:
            rows.append(Row(name, _shape(np.asarray(other.tensors[name])), math.nan, math.nan, math.nan, ONLY_OTHER))
        else:
            rows.append(compare(name, ref.tensors[name], other.tensors[name], rtol, atol))
    return rows


def first_divergence(rows: Sequence[Row]) -> Row | None:
    """The first row, in model order, whose values differ (DIFF) or cannot be compared (SHAPE)."""
    return next((r for r in rows if r.diverged), None)


def failed(rows: Sequence[Row], allow_missing: bool = False) -> bool:
    """True when any tensor diverged, or (unless allowed) a name is missing from one side,
    or nothing at all was compared (no name in common: a wrong --map passes nothing)."""
    if all(r.missing for r in rows):
        return True
    return any(r.diverged or (r.missing and not allow_missing) for r in rows)


# --------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------


def _num(x: float, fmt: str) -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def format_table(rows: Sequence[Row]) -> str:
    first = first_divergence(rows)
    width = max([len("name")] + [len(r.name) for r in rows])
    shape_width = max([len("shape")] + [len(r.shape) for r in rows])
    header = f"{'name':<{width}}  {'shape':<{shape_width}}  {'max abs':>9}  {'max rel':>9}  {'cosine':>10}  ok"
    lines = [header, "-" * (len(header) + 8)]
    for r in rows:
        line = (f"{r.name:<{width}}  {r.shape:<{shape_width}}  {_num(r.max_abs, '9.2e')}  {_num(r.max_rel, '9.2e')}  "
                f"{_num(r.cosine, '10.7f')}  {r.status:<10}")
        extra = [r.note] if r.note else []
        if r is first:
            extra.append("<== first divergence")
        lines.append((line + "  " + "  ".join(extra)).rstrip())
    return "\n".join(lines)


def _names(rows: Sequence[Row], limit: int = 5) -> str:
    names = [r.name for r in rows]
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def summary(rows: Sequence[Row], rtol: float, atol: float, allow_missing: bool = False) -> str:
    """The lines under the table: the first divergence (or that all match) and missing names."""
    compared = [r for r in rows if not r.missing]
    first = first_divergence(rows)
    lines = []
    if not compared:
        lines.append("nothing compared: the two dumps have no name in common")
    elif first is None:
        lines.append(f"all {len(compared)} compared tensors within tolerance "
                     f"(atol {atol:g} + rtol {rtol:g} * max|REF|)")
    else:
        before = compared.index(first)
        why = (f"shapes {first.shape}" if first.status == SHAPE else
               f"max abs {first.max_abs:.3e} > tolerance {first.tolerance:.3e}"
               + (f"; {first.note}" if first.note else ""))
        n_bad = sum(r.diverged for r in rows)
        lines.append(f"first divergence: {first.name} ({why}); the {before} tensor(s) before it match; "
                     f"{n_bad} of {len(compared)} compared tensors differ")
    for status, label in ((ONLY_REF, "only in REF"), (ONLY_OTHER, "only in OTHER")):
        missing = [r for r in rows if r.status == status]
        if missing:
            lines.append(f"{len(missing)} name(s) {label}{' (allowed)' if allow_missing else ''}: {_names(missing)}")
    return "\n".join(lines)
