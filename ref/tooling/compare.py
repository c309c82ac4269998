"""`refjax.compare`: another implementation's tensors against refjax's, as one report.

    report = refjax.compare("ref.safetensors", {"logits": my_logits, "h.0": my_h0}, allow_missing=True)
    assert report.ok, report          # pytest prints the table, the first divergence and why

Both sides are dumps: a path (.safetensors, .npz, .npy, a folder of .npy; ref/tooling/dumps.py),
a `Dump`, or a dict of arrays (numpy, JAX, PyTorch; a dict's order is taken as the model
order). The report holds one row per name in model order (ref/tooling/diff.py says how
one tensor is compared), the first divergence, for logits the agreement of the two
distributions (KL, top-1, top-k), and the reasons it fails, each with the option that
would change it. `refjax diff` prints this report (text, `--json`, `--junit`).

Logits agreement ("does this difference matter"), per position over the last axis, at
real positions only, in float64: KL(softmax(REF) || softmax(OTHER)) (mean and max),
top-1 agreement (the argmaxes equal) and top-k overlap (|top-k(REF) & top-k(OTHER)| / k,
averaged). They are reported always and judged only against the thresholds given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import xml.etree.ElementTree as ET
from typing import Any, Mapping, Sequence

import numpy as np

from refjax.tooling import diff
from refjax.tooling.diff import ONLY_OTHER, ONLY_REF, SHAPE, Positions, Row
from refjax.tooling.dumps import INPUT_KEYS, Dump, read_dump

DEFAULT_RTOL = DEFAULT_ATOL = 1e-5  # float32 (loosen for bf16 ports, or judge them by an envelope)
DEFAULT_TOP_K = 5
LOGITS = ("logits", "mc_logits")  # outputs that are a softmax's input over their last axis

# How a reason names the option that changes it, in Python and on the command line.
PYTHON_HINTS = {"allow_missing": "allow_missing=True", "names": "names={their: ours}",
                "max_kl": "max_kl", "max_mean_kl": "max_mean_kl", "min_top1": "min_top1", "min_topk": "min_topk"}
CLI_HINTS = {"allow_missing": "--allow-missing", "names": "--map", "max_kl": "--max-kl",
             "max_mean_kl": "--max-mean-kl", "min_top1": "--min-top1", "min_topk": "--min-topk"}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits on the logits agreement; None: reported, not judged."""

    max_kl: float | None = None  # on the largest KL over positions
    max_mean_kl: float | None = None  # on the mean KL over positions
    min_top1: float | None = None  # fraction of positions whose argmax agrees, in [0, 1]
    min_topk: float | None = None  # mean top-k overlap, in [0, 1]
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self):
        for field in ("max_kl", "max_mean_kl", "min_top1", "min_topk"):
            value = getattr(self, field)
            if value is not None and not (value >= 0 and (field.startswith("max") or value <= 1)):
                raise ValueError(f"{field} must be " + (">= 0" if field.startswith("max") else "in [0, 1]")
                                 + f", got {value}")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.max_kl, self.max_mean_kl, self.min_top1, self.min_topk))


@dataclasses.dataclass(frozen=True)
class LogitsAgreement:
    name: str
    positions: int  # positions compared (real ones unless all positions were asked for)
    kl_mean: float  # KL(softmax(REF) || softmax(OTHER)), nats
    kl_max: float
    kl_max_at: tuple[int, ...]  # the position of the largest KL: (batch, position) for [B, T, V]
    top1: float  # fraction of positions whose argmax agrees
    top1_count: int
    topk: float  # mean |top-k(REF) & top-k(OTHER)| / k
    k: int


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def logits_agreement(name: str, ref: Any, other: Any, positions: Positions, k: int) -> LogitsAgreement | None:
    """The agreement of two logits tensors over their last axis, at the positions kept;
    None when they cannot be compared (other shapes, fewer than 2 classes, non-finite)."""
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    if ref.shape != other.shape or ref.ndim < 2 or ref.shape[-1] < 2:
        return None
    keep = positions.keep(name, ref.shape)
    rows = np.flatnonzero(np.ones(ref.shape[:-1], bool) if keep is None else keep[0][..., 0])
    a, b = ref.reshape(-1, ref.shape[-1])[rows], other.reshape(-1, ref.shape[-1])[rows]
    if not rows.size or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    lp, lq = _log_softmax(a), _log_softmax(b)
    kl = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)  # >= 0; rounding can dip below
    agree = np.argmax(a, -1) == np.argmax(b, -1)
    k = min(k, ref.shape[-1])
    top_a, top_b = (np.argsort(-x, axis=-1, kind="stable")[:, :k] for x in (a, b))
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(-1).sum(-1) / k
    worst = int(np.argmax(kl))
    at = tuple(int(i) for i in np.unravel_index(rows[worst], ref.shape[:-1]))
    return LogitsAgreement(name, int(rows.size), float(kl.mean()), float(kl[worst]), at, float(agree.mean()),
                           int(agree.sum()), float(overlap.mean()), k)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
    ref: str  # what REF and OTHER were (a path, or "dict")
    other: str
    rows: tuple[Row, ...]
    order: str  # where the comparison order came from
    positions: Positions
    rtol: float
    atol: float
    logits: tuple[LogitsAgreement, ...]
    thresholds: Thresholds
    reasons: tuple[str, ...]  # why it fails, each naming the option that changes it; () when ok
    allow_missing: bool = False
    envelope: Any = None  # envelope.Envelope when the tolerances came from one
    factor: float = math.nan  # the envelope multiple
    unused_names: tuple[str, ...] = ()  # map entries that matched no name
    cli: bool = False  # render for the command line ("exit 1: ...")

    @property
    def ok(self) -> bool:
        return not self.reasons

    def __bool__(self) -> bool:
        return self.ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def first_divergence(self) -> Row | None:
        return diff.first_divergence(self.rows)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def assert_ok(self) -> None:
        """Raise AssertionError with the whole report when it fails (for tests)."""
        if not self.ok:
            raise AssertionError("\n" + self.text())

    def __str__(self) -> str:
        return self.text()

    def text(self) -> str:
        return "\n".join([_header(self), "", format_table(self), "", summary(self)])

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        counts = self.positions.counts
        return _finite({
            "ok": self.ok, "exit_code": self.exit_code, "reasons": list(self.reasons),
            "ref": self.ref, "other": self.other, "order": self.order,
            "tolerance": {"rtol": self.rtol, "atol": self.atol},
            "positions": {"source": self.positions.source, "real": counts[0] if counts else None,
                          "total": counts[1] if counts else None},
            "first_divergence": None if first is None else first.name,
            "rows": [_row_dict(r) for r in self.rows],
            "logits": [dataclasses.asdict(m) for m in self.logits],
            "thresholds": dataclasses.asdict(self.thresholds),
            "envelope": None if self.envelope is None else {**self.envelope.describe(), "factor": self.factor},
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_junit(self) -> str:
        return junit_xml(self)


def _row_dict(r: Row) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    d["at"] = None if r.at is None else list(r.at)
    return d


def _finite(x):
    """NaN and infinities -> None, so that the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# --------------------------------------------------------------------------------------
# Building it
# --------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """numpy, JAX or PyTorch (any device, bf16, requires_grad) -> numpy, without importing torch."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def as_dump(source: Any, label: str) -> Dump:
    """A path (str or os.PathLike), a Dump, or a mapping of name -> array (its order: the model order)."""
    if isinstance(source, Dump):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_dump(source)
    if isinstance(source, Mapping):
        tensors = {str(k): _to_numpy(v) for k, v in source.items()}
        return Dump(f"a dict of {len(tensors)} arrays", tensors, list(tensors))
    raise TypeError(f"{label}: expected a dump path, a Dump or a dict of arrays, got {type(source).__name__}")


def _differing_inputs(ref: Dump, other: Dump) -> list[str]:
    """Inputs both dumps hold that are not equal: the two sides did not run the same call."""
    out = []
    for name in INPUT_KEYS:
        if name in ref.tensors and name in other.tensors:
            a, b = np.asarray(ref.tensors[name]), np.asarray(other.tensors[name])
            if a.shape != b.shape or not np.array_equal(a.astype(np.float64), b.astype(np.float64)):
                out.append(name)
    return out


def _reasons(rows: Sequence[Row], logits: Sequence[LogitsAgreement], thresholds: Thresholds,
             allow_missing: bool, bad_inputs: Sequence[str], hints: Mapping[str, str]) -> list[str]:
    reasons = []
    if bad_inputs:
        reasons.append(f"the inputs differ ({', '.join(bad_inputs)}): REF and OTHER did not run the same call")
    compared = [r for r in rows if not r.missing]
    if not compared:
        reasons.append(f"nothing compared: the two dumps have no name in common (rename OTHER's onto REF's with "
                       f"{hints['names']})")
    differ = [r for r in rows if r.diverged]
    if differ:
        reasons.append(f"{len(differ)} of {len(compared)} compared tensors differ (first: {differ[0].name})")
    if compared and not allow_missing:
        only_ref = sum(r.status == ONLY_REF for r in rows)
        only_other = sum(r.status == ONLY_OTHER for r in rows)
        if only_ref:
            reasons.append(f"{only_ref} name(s) only in REF: pass {hints['allow_missing']}, or dump them")
        if only_other:
            reasons.append(f"{only_other} name(s) only in OTHER: pass {hints['allow_missing']}, or rename them "
                           f"onto REF's with {hints['names']}")
    if thresholds.given and not logits:
        reasons.append("logits thresholds were given but no logits were compared")
    for m in logits:
        for key, value, limit, worse in (("max_kl", m.kl_max, thresholds.max_kl, value_gt),
                                         ("max_mean_kl", m.kl_mean, thresholds.max_mean_kl, value_gt),
                                         ("min_top1", m.top1, thresholds.min_top1, value_lt),
                                         ("min_topk", m.topk, thresholds.min_topk, value_lt)):
            if limit is not None and worse(value, limit):
                what = {"max_kl": "KL max", "max_mean_kl": "KL mean", "min_top1": "top-1 agreement",
                        "min_topk": f"top-{m.k} overlap"}[key]
                reasons.append(f"{m.name}: {what} {value:.4g} {'>' if worse is value_gt else '<'} "
                               f"{hints[key]} {limit:g}")
    return reasons


def value_gt(value: float, limit: float) -> bool:
    return not value <= limit  # NaN fails


def value_lt(value: float, limit: float) -> bool:
    return not value >= limit


def compare(reference: Any, candidate: Any, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
            names: Mapping[str, str] | None = None, allow_missing: bool = False, all_positions: bool = False,
            attention_mask: Any = None, envelope: Any = None, factor: float | None = None,
            max_kl: float | None = None, max_mean_kl: float | None = None, min_top1: float | None = None,
            min_topk: float | None = None, top_k: int = DEFAULT_TOP_K, cli: bool = False) -> Report:
    """Compare `candidate` (another implementation's tensors) with `reference` (refjax's).

    reference, candidate: dump paths, Dumps or dicts of numpy / JAX / PyTorch arrays.
    rtol, atol:     a tensor is ok when max|REF - OTHER| <= atol + rtol * max|REF|.
    names:          renames the candidate's names onto ours ({"blk.{i}.attn_q": "layers.{i}.self_attn.q_proj"}).
    allow_missing:  names on one side only are listed but do not fail.
    all_positions:  compare padded positions too (default: only where the attention_mask is 1).
    attention_mask: the mask to use instead of the one in the reference (or candidate) dump.
    envelope:       an `envelope.Envelope` (or {name: drift}): each tensor may differ by up to
                    `factor` times what refjax itself drifts in the port's dtype.
    max_kl, max_mean_kl, min_top1, min_topk, top_k: thresholds on the logits agreement.
    Returns a Report: `.ok`, `.rows`, `.first_divergence`, `.logits`, `.reasons`, `str()`."""
    from refjax.tooling import envelope as envelope_lib

    for flag, value in (("rtol", rtol), ("atol", atol)):
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{'--' if cli else ''}{flag} must be >= 0, got {value}")
    thresholds = Thresholds(max_kl, max_mean_kl, min_top1, min_topk, top_k)
    ref, other = as_dump(reference, "REF"), as_dump(candidate, "OTHER")
    unused: list[str] = []
    if names:
        other, unused = diff.rename(other, diff.check_map(names, "--map" if cli else "names"))
    positions = diff.positions_from(ref, other, all_positions, attention_mask)
    drift, factor = envelope_lib.drift_and_factor(envelope, factor)
    rows = diff.diff(ref, other, rtol, atol, positions, drift, factor)
    logits = []
    for name in LOGITS:
        if name in ref.tensors and name in other.tensors:
            agreement = logits_agreement(name, ref.tensors[name], other.tensors[name], positions, top_k)
            if agreement is not None:
                logits.append(agreement)
    reasons = _reasons(rows, logits, thresholds, allow_missing, _differing_inputs(ref, other),
                       CLI_HINTS if cli else PYTHON_HINTS)
    order = diff.comparison_order(ref, other)[1]
    return Report(ref.path, other.path, tuple(rows), order, positions, rtol, atol, tuple(logits), thresholds,
                  tuple(reasons), allow_missing, envelope if isinstance(envelope, envelope_lib.Envelope) else None,
                  factor if drift is not None else math.nan, tuple(unused), cli)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _num(x: float, fmt: str) -> str:
    return f"{'-':>9}" if math.isnan(x) else format(x, fmt)


def _at(at: tuple[int, ...] | None) -> str:
    return "-" if at is None else "[" + ",".join(str(i) for i in at) + "]"


def _header(report: Report) -> str:
    lines = [f"REF   {report.ref}", f"OTHER {report.other}", f"{len(report.rows)} names, {report.order}"]
    counts = report.positions.counts
    if counts:
        lines.append(f"positions: {counts[0]} of {counts[1]} real ({report.positions.source}); per-token tensors "
                     f"are compared there only ({'--all-positions' if report.cli else 'all_positions=True'} "
                     "compares padding too)")
    else:
        lines.append(f"positions: {report.positions.source}")
    if report.envelope is not None or not math.isnan(report.factor):
        described = report.envelope.label() if report.envelope is not None else "the drift given"
        lines.append(f"envelope: ok when max abs <= {report.factor:g} x {described} "
                     "(or the plain tolerance, if larger)")
    return "\n".join(lines)


def format_table(report: Report) -> str:
    """One line per name (names missing from one side only when that fails the comparison)."""
    rows = [r for r in report.rows if not (r.missing and report.allow_missing)]
    first = report.first_divergence
    envelope = not math.isnan(report.factor)
    width = max([len("name")] + [len(r.name) for r in rows])
    shape_width = max([len("shape")] + [len(r.shape) for r in rows])
    at_width = max([len("at")] + [len(_at(r.at)) for r in rows])
    extra = f"  {'drift':>9}  {'ratio':>9}" if envelope else ""
    header = (f"{'name':<{width}}  {'shape':<{shape_width}}  {'max abs':>9}  {'max rel':>9}  {'rel L2':>9}  "
              f"{'1-cos':>9}  {'at':<{at_width}}{extra}  ok")
    lines = [header, "-" * (len(header) + 8)]
    for r in rows:
        line = (f"{r.name:<{width}}  {r.shape:<{shape_width}}  {_num(r.max_abs, '9.2e')}  {_num(r.max_rel, '9.2e')}  "
                f"{_num(r.rel_l2, '9.2e')}  {_num(r.one_minus_cos, '9.2e')}  {_at(r.at):<{at_width}}")
        if envelope:
            line += f"  {_num(r.drift, '9.2e')}  {_num(r.ratio, '9.2f')}"
        line += f"  {r.status:<10}"
        notes = [r.note] if r.note else []
        if r is first:
            notes.append("<== first divergence")
        lines.append((line + "  " + "  ".join(notes)).rstrip())
    return "\n".join(lines)


def _names(rows: Sequence[Row], limit: int = 5) -> str:
    names = [r.name for r in rows]
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _where(r: Row) -> str:
    """' at [2,5,13] (batch 2, position 5)': where the largest error sits."""
    if r.at is None:
        return ""
    where = f" at {_at(r.at)}"
    return where + (f" (batch {r.position[0]}, position {r.position[1]})" if r.position else "")


def describe_logits(m: LogitsAgreement, real: bool) -> str:
    at = (f"batch {m.kl_max_at[0]}, position {m.kl_max_at[1]}" if len(m.kl_max_at) == 2
          else "row " + _at(m.kl_max_at))
    return (f"{m.name}: KL(REF||OTHER) mean {m.kl_mean:.3e}, max {m.kl_max:.3e} ({at}); "
            f"top-1 agreement {m.top1_count}/{m.positions} ({100 * m.top1:.2f}%); "
            f"top-{m.k} overlap {100 * m.topk:.2f}% (over {m.positions} {'real ' if real else ''}positions)")


def summary(report: Report) -> str:
    """The lines under the table: the first divergence (or that all match), logits agreement,
    missing names, and the verdict with its reasons."""
    rows = report.rows
    compared = [r for r in rows if not r.missing]
    first = report.first_divergence
    lines = []
    if not compared:
        lines.append("nothing compared: the two dumps have no name in common")
    elif first is None:
        rule = (f"{report.factor:g} x envelope, or atol {report.atol:g} + rtol {report.rtol:g} * max|REF|"
                if not math.isnan(report.factor) else f"atol {report.atol:g} + rtol {report.rtol:g} * max|REF|")
        lines.append(f"all {len(compared)} compared tensors within tolerance ({rule})")
    else:
        before = compared.index(first)
        ratio = f", {first.ratio:.3g} x drift" if not math.isnan(first.ratio) else ""
        why = (f"shapes {first.shape}" if first.status == SHAPE else
               f"max abs {first.max_abs:.3e} > tolerance {first.tolerance:.3e}{ratio}{_where(first)}"
               + (f"; {first.note}" if first.note else ""))
        n_bad = sum(r.diverged for r in rows)
        lines.append(f"first divergence: {first.name} ({why}); the {before} tensor(s) before it match; "
                     f"{n_bad} of {len(compared)} compared tensors differ")
    for m in report.logits:
        lines.append(describe_logits(m, report.positions.counts is not None))
    for status, label in ((ONLY_REF, "only in REF"), (ONLY_OTHER, "only in OTHER")):
        missing = [r for r in rows if r.status == status]
        if missing:
            lines.append(f"{len(missing)} name(s) {label}{' (allowed)' if report.allow_missing else ''}: "
                         f"{_names(missing)}")
    if report.ok:
        lines.append("result: ok" + (" (exit 0)" if report.cli else ""))
    else:
        lines.append(("exit 1: " if report.cli else "FAIL: ") + "; ".join(report.reasons))
    return "\n".join(lines)


def junit_xml(report: Report) -> str:
    """JUnit XML for CI: one test case per name (failure: differs or missing; skipped:
    missing but allowed) and one for the logits agreement; the text report as system-out."""
    suite = ET.Element("testsuite", name="refjax diff")
    failures = skipped = 0
    for r in report.rows:
        case = ET.SubElement(suite, "testcase", classname="refjax.diff", name=r.name)
        if r.diverged:
            failures += 1
            message = (f"shapes {r.shape}" if r.status == SHAPE else
                       f"max abs {r.max_abs:.3e} > tolerance {r.tolerance:.3e}{_where(r)}")
            ET.SubElement(case, "failure", message=message, type=r.status)
        elif r.missing:
            if report.allow_missing:
                skipped += 1
                ET.SubElement(case, "skipped", message=r.status)
            else:
                failures += 1
                ET.SubElement(case, "failure", message=r.status, type="missing")
    for m in report.logits:
        case = ET.SubElement(suite, "testcase", classname="refjax.diff.logits", name=m.name)
        failed = [reason for reason in report.reasons if reason.startswith(m.name + ":")]
        if failed:
            failures += 1
            ET.SubElement(case, "failure", message="; ".join(failed), type="logits")
        ET.SubElement(case, "system-out").text = describe_logits(m, report.positions.counts is not None)
    suite.set("tests", str(len(report.rows) + len(report.logits)))
    suite.set("failures", str(failures))
    suite.set("skipped", str(skipped))
    ET.SubElement(suite, "system-out").text = report.text()
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
