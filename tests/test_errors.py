"""The error contract, one table for every family and command (README: "Errors").

Each row builds one bad thing from a golden checkpoint in a temp dir (a broken checkpoint,
a wrong config value, a malformed inputs file, a bad flag), then checks both doors:

- the library call raises the documented type (ValueError and its subclasses
  ConfigError / CheckpointError, KeyError, FileNotFoundError, NotADirectoryError) with a
  message that names the culprit (the field, the key, the file, the value);
- the CLI prints exactly one line `refjax: error: <the same message>` with no traceback,
  exits 2 (1 for `diff` reporting a mismatch, which is a result, not an error), and
  writes nothing: the --out file does not exist and no temp file is left behind.

A family joins the table with one `FamilyRows` entry below.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import struct
from typing import Any, Callable

import numpy as np
import pytest

from conftest import GOLDEN, golden_inputs
from refjax.params.checkpoint import load_checkpoint
from refjax.params.io import read_safetensors, write_safetensors
from refjax.tooling import cli
from refjax.tooling.families import FAMILIES


@dataclasses.dataclass(frozen=True)
class FamilyRows:
    lm: str  # golden case with a language-model head (generate works)
    other: str  # golden case with a head that cannot generate
    tensor: str  # a per-layer weight key of `lm`'s checkpoint
    size_field: str  # a positive size in config.json
    layers_field: str
    heads_field: str | None  # must divide the hidden size (None: single-head attention)
    activation_field: str
    position_table: int | None  # positions the family's table holds (None: rotary, no table)
    extra_config: tuple[tuple[str, Any, str], ...] = ()  # (field, bad value, culprit regex)


FAMILY_ROWS = {
    "gpt2": FamilyRows(
        lm="gpt2/lm", other="gpt2/tokcls", tensor="transformer.h.1.attn.c_attn.weight", size_field="n_embd",
        layers_field="n_layer", heads_field="n_head", activation_field="activation_function", position_table=48,
        extra_config=(("n_positions", -4, "'n_positions'"), ("layer_norm_epsilon", "small", "'layer_norm_epsilon'"),
                      ("summary_type", "median", "'summary_type'"))),
    "arcee": FamilyRows(
        lm="arcee/causal-lm", other="arcee/tokcls", tensor="model.layers.1.self_attn.q_proj.weight",
        size_field="hidden_size", layers_field="num_hidden_layers", heads_field="num_attention_heads",
        activation_field="hidden_act", position_table=None,
        extra_config=(("num_key_value_heads", 3, "'num_key_value_heads'"),
                      ("rope_scaling", {"rope_type": "ntk-by-parts", "factor": 2.0}, "'rope_scaling.rope_type'"),
                      ("rope_scaling", {"rope_type": "linear"}, "'rope_scaling.factor'"),
                      ("rms_norm_eps", -1e-6, "'rms_norm_eps'"),
                      ("head_dim", 7, "'head_dim'"),
                      ("rope_scaling", {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
                       "'rope_scaling.factor'"))),
    "roformer": FamilyRows(
        lm="roformer/causal-lm", other="roformer/mlm", tensor="roformer.encoder.layer.1.attention.self.query.weight",
        size_field="hidden_size", layers_field="num_hidden_layers", heads_field="num_attention_heads",
        activation_field="hidden_act", position_table=48,
        extra_config=(("embedding_size", 0, "'embedding_size'"), ("layer_norm_eps", -1.0, "'layer_norm_eps'"),
                      ("type_vocab_size", "two", "'type_vocab_size'"), ("rotary_value", "yes", "'rotary_value'"))),
    "mega": FamilyRows(
        lm="mega/causal-lm", other="mega/qa", tensor="mega.layers.1.mega_layer.v_proj.weight",
        size_field="hidden_size", layers_field="num_hidden_layers", heads_field=None, activation_field="activation",
        position_table=None,
        extra_config=(("normalization_type", "groupnorm", "'normalization_type'"),
                      ("attention_activation", "sigmoid", "'attention_activation'"),
                      ("relative_positional_bias", "alibi", "'relative_positional_bias'"),
                      ("ema_projection_size", 0, "'ema_projection_size'"),
                      ("chunk_size", 0, "'chunk_size'"))),
    "ibert": FamilyRows(  # no causal LM: `lm` is the quant-mode masked LM, checked as any checkpoint
        lm="ibert/quant-mlm", other="ibert/qa", tensor="ibert.encoder.layer.1.attention.self.query.weight",
        size_field="hidden_size", layers_field="num_hidden_layers", heads_field="num_attention_heads",
        activation_field="hidden_act", position_table=22,  # max_position_embeddings 24 - pad_token_id 1 - 1
        extra_config=(("force_dequant", "everything", "'force_dequant'"), ("quant_mode", "yes", "'quant_mode'"),
                      ("position_embedding_type", "rotary", "'position_embedding_type'"),
                      ("pad_token_id", 30, "max_position_embeddings.*pad_token_id"))),
}


@dataclasses.dataclass
class Setup:
    library: Callable[[], Any] | None  # the library call (None: the row is about CLI flags only)
    argv: list[str]  # the CLI call; "OUT" is replaced by the output path


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    prepare: Callable[[Any], Setup]  # tmp_path -> Setup
    error: type | None  # library exception type (None when library is None)
    culprit: str  # regex the message must contain
    exit_code: int = 2


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def golden_dir(case: str) -> str:
    return os.path.join(GOLDEN, case)


def copy_case(case: str, tmp) -> str:
    dst = os.path.join(tmp, "ckpt")
    shutil.copytree(golden_dir(case), dst)
    return dst


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def loaded(case: str):
    return load_checkpoint(golden_dir(case))


def write_inputs(tmp, tensors: dict[str, np.ndarray]) -> str:
    path = os.path.join(tmp, "in.safetensors")
    write_safetensors(path, tensors)
    return path


def forward_argv(ckpt: str, inputs: str) -> list[str]:
    return ["forward", ckpt, "--inputs", inputs, "--out", "OUT"]


def edit_json(path: str, edit: Callable[[Any], Any]) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data = edit(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def set_field(field: str, value: Any) -> Callable[[dict], dict]:
    def edit(config):
        config[field] = value
        return config
    return edit


def edit_tensors(path: str, edit: Callable[[dict], dict]) -> None:
    tensors, metadata = read_safetensors(path)
    tensors = edit({k: np.array(v) for k, v in tensors.items()})
    write_safetensors(path, tensors, metadata)


def checkpoint_row(id: str, case: str, break_it: Callable[[str], None], error: type, culprit: str) -> Row:
    """Break a copy of `case`; the library call is load_checkpoint, the CLI call `forward`."""

    def prepare(tmp):
        ckpt = copy_case(case, tmp)
        break_it(ckpt)
        inputs = write_inputs(tmp, golden_inputs(case))
        return Setup(lambda: load_checkpoint(ckpt), forward_argv(ckpt, inputs))

    return Row(id, prepare, error, culprit)


def input_row(id: str, case: str, make: Callable[[dict], dict], culprit: str, error: type = ValueError) -> Row:
    """Bad inputs for a sound checkpoint; the library call is the family's forward."""

    def prepare(tmp):
        tensors = make({k: v.copy() for k, v in golden_inputs(case).items()})
        inputs = write_inputs(tmp, tensors)
        ck = loaded(case)

        def library():
            return FAMILIES[ck.family].forward(ck.params, ck.config, **tensors)

        return Setup(library, forward_argv(golden_dir(case), inputs))

    return Row(id, prepare, error, culprit)


def cli_row(id: str, argv: list[str], culprit: str, exit_code: int = 2, files: dict | None = None) -> Row:
    """A CLI-only row; `files` writes {name: bytes} into the temp dir first (TMP/name in argv)."""

    def prepare(tmp):
        for name, data in (files or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        return Setup(None, [a.replace("GOLDEN", GOLDEN).replace("TMP", str(tmp)) for a in argv])

    return Row(id, prepare, None, culprit, exit_code)


def truncate(path: str, keep: float) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def garbage_header(path: str) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    (n,) = struct.unpack("<Q", data[:8])
    data[8: 8 + min(n, 40)] = b"#" * min(n, 40)
    with open(path, "wb") as f:
        f.write(bytes(data))


def shard_case(family: str) -> str | None:
    case = f"{family}/sharded"
    return case if os.path.isdir(golden_dir(case)) else None


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def family_rows(family: str, f: FamilyRows) -> list[Row]:
    lm, W = f.lm, "model.safetensors"
    rows = [
        # checkpoint directory and files
        Row(f"{family}-missing-dir", lambda tmp: Setup(
            lambda: load_checkpoint(os.path.join(tmp, "nope")),
            forward_argv(os.path.join(tmp, "nope"), write_inputs(tmp, golden_inputs(lm)))),
            FileNotFoundError, "nope"),
        Row(f"{family}-file-not-dir", lambda tmp: Setup(
            lambda: load_checkpoint(os.path.join(golden_dir(lm), W)),
            forward_argv(os.path.join(golden_dir(lm), W), write_inputs(tmp, golden_inputs(lm)))),
            FileNotFoundError, "model.safetensors' is not a directory"),
        checkpoint_row(f"{family}-no-config", lm, lambda d: os.remove(os.path.join(d, "config.json")),
                       FileNotFoundError, "config.json"),
        checkpoint_row(f"{family}-config-invalid-json", lm,
                       lambda d: open(os.path.join(d, "config.json"), "w").write("{\"model_type\": "),
                       ValueError, r"config\.json: invalid JSON"),
        checkpoint_row(f"{family}-config-not-object", lm,
                       lambda d: open(os.path.join(d, "config.json"), "w").write("[1, 2]"),
                       ValueError, "expected a JSON object"),
        checkpoint_row(f"{family}-no-weights", lm, lambda d: os.remove(os.path.join(d, W)),
                       FileNotFoundError, "model.safetensors"),
        checkpoint_row(f"{family}-weights-truncated", lm, lambda d: truncate(os.path.join(d, W), 0.6),
                       ValueError, "model.safetensors"),
        checkpoint_row(f"{family}-weights-zero-bytes", lm, lambda d: truncate(os.path.join(d, W), 0.0),
                       ValueError, "model.safetensors"),
        checkpoint_row(f"{family}-weights-garbage-header", lm, lambda d: garbage_header(os.path.join(d, W)),
                       ValueError, "model.safetensors"),
        checkpoint_row(f"{family}-missing-tensor", lm,
                       lambda d: edit_tensors(os.path.join(d, W), lambda t: {k: v for k, v in t.items() if k != f.tensor}),
                       ValueError, re.escape(f"missing tensor '{f.tensor}'")),
        checkpoint_row(f"{family}-unexpected-tensor", lm,
                       lambda d: edit_tensors(os.path.join(d, W), lambda t: {**t, "extra.weight": np.zeros(3, np.float32)}),
                       ValueError, "unexpected tensor 'extra.weight'"),
        checkpoint_row(f"{family}-misshaped-tensor", lm,
                       lambda d: edit_tensors(os.path.join(d, W), lambda t: {**t, f.tensor: t[f.tensor][:-1]}),
                       ValueError, re.escape(f"tensor '{f.tensor}' has shape")),
        checkpoint_row(f"{family}-integer-tensor", lm,
                       lambda d: edit_tensors(os.path.join(d, W), lambda t: {**t, f.tensor: t[f.tensor].astype(np.int32)}),
                       ValueError, re.escape(f"tensor '{f.tensor}' has dtype int32")),
        checkpoint_row(f"{family}-nan-tensor", lm,
                       lambda d: edit_tensors(os.path.join(d, W), lambda t: {**t, f.tensor: np.where(
                           np.arange(t[f.tensor].size).reshape(t[f.tensor].shape) == 3, np.nan, t[f.tensor])
                           .astype(t[f.tensor].dtype)}),
                       ValueError, re.escape(f"tensor '{f.tensor}' holds 1 non-finite")),
        # config values
        checkpoint_row(f"{family}-unknown-model-type", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), set_field("model_type", "bert")),
                       ValueError, "'model_type' is 'bert'; accepted values"),
        checkpoint_row(f"{family}-unknown-architecture", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), set_field("architectures", ["Nope"])),
                       ValueError, "architecture 'Nope' is not supported; accepted values"),
        checkpoint_row(f"{family}-negative-size", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), set_field(f.size_field, -16)),
                       ValueError, f"'{f.size_field}' must be >= 1, got -16"),
        checkpoint_row(f"{family}-zero-layers", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), set_field(f.layers_field, 0)),
                       ValueError, f"'{f.layers_field}' must be >= 1, got 0"),
        checkpoint_row(f"{family}-unknown-activation", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), set_field(f.activation_field, "swish2")),
                       ValueError, f"'{f.activation_field}' is 'swish2'; accepted values"),
        checkpoint_row(f"{family}-size-not-integer", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), set_field(f.size_field, 16.5)),
                       ValueError, f"'{f.size_field}' must be an integer"),
        checkpoint_row(f"{family}-missing-required-field", lm,
                       lambda d: edit_json(os.path.join(d, "config.json"), lambda c: {k: v for k, v in c.items()
                                                                                     if k != "model_type"}),
                       ValueError, "'model_type' is None"),
        # inputs
        input_row(f"{family}-id-negative", lm, lambda t: {**t, "input_ids": np.where(
            np.arange(t["input_ids"].size).reshape(t["input_ids"].shape) == 1, -1, t["input_ids"])},
            r"input_ids contains -1, outside \[0, \d+\)"),
        input_row(f"{family}-id-at-vocab", lm, lambda t: {**t, "input_ids": t["input_ids"] * 0 + loaded(lm).config.vocab_size},
                  r"input_ids contains \d+, outside \[0, \d+\) \(vocab_size=\d+\)"),
        input_row(f"{family}-mask-shape", lm, lambda t: {**t, "attention_mask": t["attention_mask"][:, :-1]},
                  "attention_mask"),
        input_row(f"{family}-empty-batch", lm, lambda t: {k: v[:0] for k, v in t.items()}, "input_ids"),
        input_row(f"{family}-empty-sequence", lm, lambda t: {k: v[:, :0] for k, v in t.items()}, "input_ids"),
        cli_row(f"{family}-float-ids-file", ["forward", f"GOLDEN/{lm}", "--inputs", "TMP/f.safetensors", "--out", "OUT"],
                "'input_ids' must be an integer tensor", files={"f.safetensors": _safetensors_bytes(
                    {"input_ids": np.ones((1, 3), np.float32)})}),
        cli_row(f"{family}-no-input-ids-in-file", ["forward", f"GOLDEN/{lm}", "--inputs", "TMP/f.safetensors", "--out", "OUT"],
                "no 'input_ids' tensor", files={"f.safetensors": _safetensors_bytes(
                    {"attention_mask": np.ones((1, 3), np.int32)})}),
        # CLI flags and files
        cli_row(f"{family}-no-inputs", ["forward", f"GOLDEN/{lm}", "--out", "OUT"], "--text --inputs is required"),
        cli_row(f"{family}-inputs-missing", ["forward", f"GOLDEN/{lm}", "--inputs", "TMP/none.safetensors", "--out", "OUT"],
                "none.safetensors"),
        cli_row(f"{family}-inputs-not-safetensors", ["forward", f"GOLDEN/{lm}", "--inputs", f"GOLDEN/{lm}/config.json",
                                                     "--out", "OUT"], "config.json"),
        cli_row(f"{family}-out-folder-missing", ["forward", f"GOLDEN/{lm}", "--inputs", f"GOLDEN/{lm}/golden.safetensors",
                                                 "--out", "TMP/no/such/out.safetensors"], "no/such"),
        cli_row(f"{family}-unknown-dtype", ["forward", f"GOLDEN/{lm}", "--text", "x", "--out", "OUT", "--dtype", "int4"],
                "--dtype: invalid choice: 'int4'"),
        cli_row(f"{family}-negative-new-tokens", ["generate", f"GOLDEN/{lm}", "--inputs", "TMP/p.safetensors",
                                                  "--max-new-tokens", "-3", "--out", "OUT"], "--max-new-tokens",
                files={"p.safetensors": _safetensors_bytes({"input_ids": np.ones((1, 3), np.int32)})}),
        cli_row(f"{family}-generate-non-lm", ["generate", f"GOLDEN/{f.other}", "--inputs", "TMP/p.safetensors", "--out", "OUT"],
                loaded(f.other).config.architecture,
                files={"p.safetensors": _safetensors_bytes({"input_ids": np.ones((1, 3), np.int32)})}),
        # diff on dumps
        cli_row(f"{family}-diff-missing-dump", ["diff", f"GOLDEN/{lm}/golden.safetensors", "TMP/none.safetensors"],
                "none.safetensors"),
        cli_row(f"{family}-diff-corrupt-dump", ["diff", f"GOLDEN/{lm}/golden.safetensors", "TMP/bad.safetensors"],
                "bad.safetensors", files={"bad.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"}),
    ]
    if f.heads_field:
        rows.append(checkpoint_row(f"{family}-heads-do-not-divide", lm,
                                   lambda d: edit_json(os.path.join(d, "config.json"), set_field(f.heads_field, 3)),
                                   ValueError, f"'{f.heads_field}'.*must divide|must divide.*'{f.heads_field}'"))
    for field, value, culprit in f.extra_config:
        rows.append(checkpoint_row(f"{family}-config-{field}-{json.dumps(value, sort_keys=True)[:24]}", lm,
                                   lambda d, field=field, value=value: edit_json(os.path.join(d, "config.json"),
                                                                                 set_field(field, value)),
                                   ValueError, culprit))
    if f.position_table is not None:
        rows += [
            input_row(f"{family}-longer-than-positions", lm,
                      lambda t: {k: np.tile(v, (1, f.position_table // v.shape[1] + 1)) for k, v in t.items()},
                      rf"position table|{f.position_table}"),
        ]
    if f.position_table is not None and FAMILIES[family].lm_architectures:
        rows += [
            cli_row(f"{family}-generate-past-positions",
                    ["generate", f"GOLDEN/{lm}", "--inputs", "TMP/p.safetensors",
                     "--max-new-tokens", str(f.position_table), "--out", "OUT"], "position table",
                    files={"p.safetensors": _safetensors_bytes({"input_ids": np.ones((1, 3), np.int32)})}),
        ]
    if family == "mega":  # a length the chunking cannot split as HF requires
        rows.append(input_row("mega-chunking-cannot-split", "mega/causal-lm-chunking",
                              lambda t: {k: v[:, :6] for k, v in t.items()}, r"multiple of config\.chunk_size \(4\)"))
    if shard_case(family):
        index = "model.safetensors.index.json"
        rows += [
            checkpoint_row(f"{family}-index-invalid-json", shard_case(family),
                           lambda d: open(os.path.join(d, index), "w").write("{"), ValueError, "invalid sharded index"),
            checkpoint_row(f"{family}-index-missing-shard", shard_case(family),
                           lambda d: os.remove(os.path.join(d, "model-00002-of-00002.safetensors")),
                           FileNotFoundError, "model-00002-of-00002.safetensors"),
            checkpoint_row(f"{family}-index-wrong-shard", shard_case(family),
                           lambda d: edit_json(os.path.join(d, index), _swap_one_shard), ValueError,
                           r"the index maps it to 'model-0000\d-of-00002\.safetensors'"),
        ]
    return rows


def _swap_one_shard(index: dict) -> dict:
    weight_map = index["weight_map"]
    key = sorted(weight_map)[0]
    other = sorted(set(weight_map.values()) - {weight_map[key]})[0]
    weight_map[key] = other
    return index


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    import safetensors.numpy

    return safetensors.numpy.save(tensors)


ROWS = [row for family, f in FAMILY_ROWS.items() for row in family_rows(family, f)]


def test_table_is_large_and_ids_are_unique():
    assert len(ROWS) >= 50
    assert len({r.id for r in ROWS}) == len(ROWS)


def _message(e: BaseException) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_error_row(row: Row, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    setup = row.prepare(str(work))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_path = str(out_dir / "out.safetensors")
    argv = [out_path if a == "OUT" else a for a in setup.argv]

    message = None
    if setup.library is not None:
        with pytest.raises(row.error) as info:
            setup.library()
        message = _message(info.value)
        assert re.search(row.culprit, message), f"library message does not name the culprit: {message!r}"

    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors (flags) exit through SystemExit
        code = e.code
    out, err = capsys.readouterr()
    assert code == row.exit_code, (code, out, err)
    if row.exit_code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("refjax: error: "), err
        assert "Traceback" not in err
        assert re.search(row.culprit, lines[0]), f"CLI message does not name the culprit: {lines[0]!r}"
        if message is not None:
            assert lines[0] == f"refjax: error: {message}"
    assert os.listdir(out_dir) == [], f"something was written: {os.listdir(out_dir)}"
