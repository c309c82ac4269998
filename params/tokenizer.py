"""Load a checkpoint directory's tokenizer as a `tokenizers.Tokenizer`.

Two ways a Hugging Face checkpoint ships its tokenizer:

1. ``tokenizer.json`` -- the full `tokenizers` serialization. Loaded as is, for any family.
2. The family's "slow" files -- for GPT-2 ``vocab.json`` + ``merges.txt``. We rebuild the
   fast tokenizer from them exactly as ``transformers.convert_slow_tokenizer.GPT2Converter``
   does, so ids match ``GPT2TokenizerFast`` / ``GPT2Tokenizer`` token for token.

Either way, the special tokens named in ``tokenizer_config.json`` / ``special_tokens_map.json``
(e.g. GPT-2's ``<|endoftext|>``) are registered as special added tokens, so that text
containing them encodes to their single id, as in HF.

Runtime dependencies: `tokenizers` and the standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from refjax.params import hub

__all__ = ["load_tokenizer", "encode", "decode", "BUILDERS"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MODEL_CONFIG = "config.json"

# The tokenizer_config.json / special_tokens_map.json keys that name special tokens
# (HF's SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token",
    "pad_token", "cls_token", "mask_token", "additional_special_tokens",
)


# --------------------------------------------------------------------------- public API


def load_tokenizer(checkpoint_dir: str | os.PathLike, family: str | None = None,
                   revision: str | None = None) -> Tokenizer:
    """The tokenizer of the checkpoint in `checkpoint_dir` (a directory, or a model id in the
    local HF cache at `revision`, as `load_checkpoint` takes it: params/hub.py).

    `family` picks how to build it from the slow files when there is no ``tokenizer.json``;
    by default it is config.json's ``model_type``, or ``"gpt2"`` when there is no config.json.

    Raises FileNotFoundError (naming the directory and the files looked for) when the
    directory holds no tokenizer files, and ValueError (naming the file) when one is corrupt.
    """
    directory = Path(hub.resolve(checkpoint_dir, revision))
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    tokenizer_config = _read_json_object(directory / TOKENIZER_CONFIG, missing_ok=True)

    if (directory / TOKENIZER_JSON).is_file():
        tokenizer = _load_tokenizer_json(directory / TOKENIZER_JSON)
        _apply_add_prefix_space(tokenizer, tokenizer_config)
    else:
        family = family or _model_type(directory)
        if family not in BUILDERS:
            raise ValueError(
                f"no {TOKENIZER_JSON} in {str(directory)!r}, and no tokenizer builder for "
                f"model_type {family!r} (supported: {', '.join(sorted(BUILDERS))})"
            )
        tokenizer = BUILDERS[family](directory, tokenizer_config)

    _add_config_tokens(tokenizer, directory, tokenizer_config)
    family = family or _model_type(directory)
    if family in CODE_PRE_TOKENIZERS:  # not serialisable, so never in tokenizer.json: attached here, as HF does
        tokenizer.pre_tokenizer = CODE_PRE_TOKENIZERS[family](tokenizer.get_vocab())
    return tokenizer


def encode(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`, like HF's ``tokenizer.encode(text)``."""
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def decode(tokenizer: Tokenizer, ids: list[int], *, skip_special_tokens: bool = False) -> str:
    """Text of `ids`, like HF's ``tokenizer.decode(ids)`` (special tokens kept by default --
    note `tokenizers`' own default is to drop them). Out-of-range ids are an error, not
    silently skipped."""
    ids = [int(i) for i in ids]
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise ValueError(f"token ids out of range [0, {size}): {bad[:10]}")
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------- GPT-2


def _build_gpt2(directory: Path, tokenizer_config: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from vocab.json + merges.txt, mirroring HF's GPT2Converter."""
    tokenizer, vocab, vocab_path = _byte_level_bpe(directory)
    # GPT-2 has no normalizer. Note tokenizers' ByteLevel defaults to add_prefix_space=True;
    # HF's GPT-2 default is False.
    add_prefix_space = bool(tokenizer_config.get("add_prefix_space", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    if tokenizer_config.get("add_bos_token", False):
        bos = _token_content(tokenizer_config.get("bos_token", "<|endoftext|>"))
        if bos not in vocab:
            raise ValueError(f"bos_token {bos!r} (add_bos_token) is not in {vocab_path}")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    else:
        # A no-op for ids (trim_offsets=False); HF sets it, so we do too.
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _byte_level_bpe(directory: Path) -> tuple[Tokenizer, dict[str, int], Path]:
    """The BPE model of vocab.json + merges.txt (GPT-2's and RoBERTa's slow files), with
    HF's converter settings; the caller adds pre-tokenizer, decoder and post-processor."""
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"no tokenizer files in {str(directory)!r}: looked for {TOKENIZER_JSON}, or "
            f"vocab.json + merges.txt (missing: {', '.join(missing)})"
        )
    vocab = _read_vocab(vocab_path)
    merges = _read_merges(merges_path)
    try:
        bpe = models.BPE(
            vocab=vocab, merges=merges, dropout=None,
            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
        )
    except Exception as e:  # tokenizers raises a bare Exception, e.g. a merge of unknown tokens
        raise ValueError(f"{merges_path} does not fit {vocab_path}: {e}") from e
    return Tokenizer(bpe), vocab, vocab_path


# --------------------------------------------------------------------------- MEGA (RoBERTa BPE)


def _build_mega(directory: Path, tokenizer_config: dict[str, Any]) -> Tokenizer:
    """MEGA's tokenizer (mnaylor/mega-base-wikitext) is RoBERTa's byte-level BPE, built as
    HF's RobertaConverter + RobertaTokenizerFast do: GPT-2's BPE and ByteLevel pre-tokenizer
    (add_prefix_space default false), `<s> $A </s>` (`<s> $A </s> </s> $B </s>` for pairs)
    via RobertaProcessing, and the special tokens <s> <pad> </s> <unk> plus <mask>, which
    strips the space to its left (RoBERTa's lstrip=True)."""
    tokenizer, vocab, vocab_path = _byte_level_bpe(directory)
    add_prefix_space = bool(tokenizer_config.get("add_prefix_space", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    names = {key: _token_content(tokenizer_config.get(key) or default) for key, default in (
        ("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("sep_token", "</s>"),
        ("cls_token", "<s>"), ("pad_token", "<pad>"), ("mask_token", "<mask>"))}
    for key in ("cls_token", "sep_token"):
        if names[key] not in vocab:
            raise ValueError(f"{key} {names[key]!r} is not in {vocab_path}")
    cls, sep = names["cls_token"], names["sep_token"]
    # sep and cls positionally: tokenizers 0.23 renamed the `cls` keyword to `cls_token`
    tokenizer.post_processor = processors.RobertaProcessing(
        (sep, vocab[sep]), (cls, vocab[cls]), add_prefix_space=add_prefix_space,
        trim_offsets=bool(tokenizer_config.get("trim_offsets", True)))
    specials = [AddedToken(names[k], special=True, normalized=True)
                for k in ("bos_token", "pad_token", "eos_token", "unk_token")]
    specials.append(AddedToken(names["mask_token"], lstrip=True, rstrip=False, normalized=False, special=True))
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json_object(path)
    for token, index in vocab.items():
        if type(index) is not int or index < 0:
            raise ValueError(f"corrupt {path}: id of token {token!r} is {index!r}, not an int >= 0")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional '#version' header, then one 'left right' pair per line."""
    merges = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"corrupt {path}: line {number} is {line!r}, not 'left right'")
        merges.append((parts[0], parts[1]))
    return merges


# --------------------------------------------------------------------------- RoFormer


class MissingDependencyError(ImportError):
    """An optional package a tokenizer needs is not installed; the message has the pip command."""


class JiebaSplit:
    """RoFormer's pre-tokenizer (HF `models/roformer/tokenization_utils.py: JiebaPreTokenizer`):
    rjieba word segmentation (hmm=False) of the normalized text; a word in the vocabulary stays
    whole, any other word is split like BERT's normalizer would (spaces around CJK characters,
    then on whitespace). Reproduced quirk: the offsets of those pieces advance by their own
    lengths only, so whitespace inside a word shifts the following pieces (as in HF)."""

    def __init__(self, vocab: dict[str, int]):
        try:
            import rjieba
        except ImportError:
            raise MissingDependencyError(
                "the RoFormer tokenizer needs rjieba (jieba word segmentation), which is not installed: "
                "pip install rjieba  (or: pip install 'refjax[chinese]')") from None
        self.jieba = rjieba
        self.vocab = vocab
        self.bert_split = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True,
                                                     strip_accents=False, lowercase=False)

    def split(self, _index: int, text):  # text: tokenizers.NormalizedString
        pieces = []
        for word, start, end in self.jieba.tokenize(str(text), hmm=False):
            if word in self.vocab:
                pieces.append(text[start:end])
                continue
            for part in self.bert_split.normalize_str(word).split():
                end = start + len(part)
                pieces.append(text[start:end])
                start = end
        return pieces

    def pre_tokenize(self, pretok) -> None:
        pretok.split(self.split)


def jieba_pre_tokenizer(vocab: dict[str, int]) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.PreTokenizer.custom(JiebaSplit(vocab))


def _build_roformer(directory: Path, tokenizer_config: dict[str, Any]) -> Tokenizer:
    """BERT WordPiece from vocab.txt, as HF's RoFormerConverter + RoFormerTokenizerFast build
    it: BertNormalizer (clean_text, no CJK spacing: jieba segments; lowercase = do_lower_case,
    default true; strip_accents as configured, null following lowercase), [CLS] $A [SEP]
    ([CLS] $A [SEP] $B [SEP] for pairs). The jieba pre-tokenizer is attached by `load_tokenizer`."""
    vocab_path = directory / "vocab.txt"
    if not vocab_path.is_file():
        raise FileNotFoundError(f"no tokenizer files in {str(directory)!r}: looked for {TOKENIZER_JSON} or vocab.txt")
    lines = _read_text(vocab_path).split("\n")  # HF's load_vocab: readlines(), newline stripped
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {}
    for index, token in enumerate(lines):
        vocab[token] = index  # a repeated token keeps its last id, as in HF
    names = {key: _token_content(tokenizer_config.get(key, default)) for key, default in (
        ("unk_token", "[UNK]"), ("cls_token", "[CLS]"), ("sep_token", "[SEP]"))}
    for key, token in names.items():
        if token not in vocab:
            raise ValueError(f"{key} {token!r} is not in {vocab_path}")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=names["unk_token"], continuing_subword_prefix="##",
                                           max_input_chars_per_word=100))
    lowercase = bool(tokenizer_config.get("do_lower_case", True))
    strip_accents = tokenizer_config.get("strip_accents")
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                                      strip_accents=strip_accents, lowercase=lowercase)
    cls, sep = names["cls_token"], names["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # RoFormerTokenizerFast's special tokens (its defaults unless the config names others),
    # matched in the raw text before normalization
    specials = [_token_content(tokenizer_config.get(key) or default) for key, default in (
        ("unk_token", "[UNK]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"), ("cls_token", "[CLS]"),
        ("mask_token", "[MASK]"))]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tokenizer


# model_type -> a pre-tokenizer that exists only in code (PreTokenizer.custom cannot be saved),
# built from the final vocabulary; applied whether the tokenizer came from tokenizer.json or not.
CODE_PRE_TOKENIZERS: dict[str, Callable[[dict[str, int]], Any]] = {
    "roformer": jieba_pre_tokenizer,
}


# model_type (config.json) -> builder from the family's slow tokenizer files.
BUILDERS: dict[str, Callable[[Path, dict[str, Any]], Tokenizer]] = {
    "gpt2": _build_gpt2,
    "roformer": _build_roformer,
    "mega": _build_mega,
}


# --------------------------------------------------------------------------- shared steps


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON / bad schema
        raise ValueError(f"corrupt {path}: {e}") from e


def _apply_add_prefix_space(tokenizer: Tokenizer, tokenizer_config: dict[str, Any]) -> None:
    """HF's fast tokenizers overwrite a ByteLevel pre-tokenizer's add_prefix_space with the
    tokenizer_config.json value. We do the same when the config states it explicitly.
    (HF also does it when the key is absent, forcing False for GPT-2; we keep tokenizer.json's.)"""
    if "add_prefix_space" not in tokenizer_config:
        return
    pre = tokenizer.pre_tokenizer
    if isinstance(pre, pre_tokenizers.ByteLevel):
        pre.add_prefix_space = bool(tokenizer_config["add_prefix_space"])
        tokenizer.pre_tokenizer = pre


def _add_config_tokens(tokenizer: Tokenizer, directory: Path, tokenizer_config: dict[str, Any]) -> None:
    """Register the added/special tokens the config files name. Tokens already in the
    vocabulary keep their id; adding an already-added token is a no-op."""
    tokens: dict[str, AddedToken] = {}
    # 1. tokenizer_config.json "added_tokens_decoder": {"<id>": {"content": ..., flags}}, by id.
    try:
        decoder = tokenizer_config.get("added_tokens_decoder") or {}
        for _, spec in sorted(decoder.items(), key=lambda item: int(item[0])):
            token = _added_token(spec, default_special=False)
            tokens.setdefault(token.content, token)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"corrupt {directory / TOKENIZER_CONFIG}: added_tokens_decoder: {e}") from e
    # 2. bos/eos/unk/... in tokenizer_config.json, then special_tokens_map.json.
    special_map = _read_json_object(directory / SPECIAL_TOKENS_MAP, missing_ok=True)
    for name, source in ((TOKENIZER_CONFIG, tokenizer_config), (SPECIAL_TOKENS_MAP, special_map)):
        for key in _SPECIAL_TOKEN_KEYS:
            value = source.get(key)
            for spec in value if isinstance(value, list) else [value]:
                if spec is not None:
                    try:
                        token = _added_token(spec, default_special=True)
                    except ValueError as e:
                        raise ValueError(f"corrupt {directory / name}: {key}: {e}") from e
                    tokens.setdefault(token.content, token)
    tokenizer.add_special_tokens([t for t in tokens.values() if t.special])
    tokenizer.add_tokens([t for t in tokens.values() if not t.special])


def _added_token(spec: str | dict[str, Any], *, default_special: bool) -> AddedToken:
    """AddedToken from a config entry: a plain string or a serialized AddedToken dict.
    Defaults are HF's for GPT-2 (normalized=True, no stripping)."""
    if isinstance(spec, str):
        return AddedToken(spec, normalized=True, special=default_special)
    if not isinstance(spec, dict):
        raise ValueError(f"bad token entry {spec!r}: expected a string or {{'content': ...}}")
    return AddedToken(
        _token_content(spec),
        single_word=bool(spec.get("single_word", False)),
        lstrip=bool(spec.get("lstrip", False)),
        rstrip=bool(spec.get("rstrip", False)),
        normalized=bool(spec.get("normalized", True)),
        special=bool(spec.get("special", default_special)),
    )


def _token_content(spec: str | dict[str, Any]) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and isinstance(spec.get("content"), str):
        return spec["content"]
    raise ValueError(f"bad special token entry {spec!r}: expected a string or {{'content': ...}}")


def _model_type(directory: Path) -> str:
    config = _read_json_object(directory / MODEL_CONFIG, missing_ok=True)
    return str(config.get("model_type", "gpt2"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corrupt {path}: not UTF-8 ({e})") from e


def _read_json_object(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"corrupt {path}: expected a JSON object, got {type(data).__name__}")
    return data
