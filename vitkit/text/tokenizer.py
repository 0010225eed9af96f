"""Tokenizers for the text towers: CLIP's BPE, SigLIP's SentencePiece, and a byte-level BPE trained on captions.

Every tokenizer turns a text or a list of texts into a (N, context_length) int64 tensor: the start
token (when the scheme has one), the text's ids, the end token, then padding; a text too long is
cut to the context length with the end token kept last, as CLIP does. ``to_config()`` is a JSON
dict that ``load_tokenizer`` rebuilds the tokenizer from (it travels in a model's metadata), and
``save(dir)`` writes ``tokenizer_config.json`` plus the vocabulary file so that a run directory
can rebuild its tokenizer offline. They are built on the ``tokenizers`` and ``sentencepiece``
packages (``pip install 'vitkit[clip]'``), imported only when a tokenizer is made.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import inspect
import json
import os
import re
import string
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, PathNotFoundError

CONFIG_FILE = "tokenizer_config.json"
CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
SOT, EOT, PAD = "<start_of_text>", "<end_of_text>", "<pad>"
# CLIP's vocabulary: 256 bytes, the same with the end-of-word mark, 48894 merges, SOT and EOT = 49408 ids.
_CLIP_MERGES = 49152 - 256 - 2
# CLIP's word pattern: contractions, runs of letters, single digits, runs of other non-space characters.
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError("text tokenizers need the 'tokenizers' package: pip install 'vitkit[clip]'") from e
    # Tokenizing in the training process and then forking loader workers makes the Rust thread pool
    # warn and disable itself in every worker; start with it off unless the user chose.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return tokenizers


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ConfigError("SentencePiece tokenizers need the 'sentencepiece' package: pip install 'vitkit[clip]'") from e
    return sentencepiece


# The parts of ftfy.fix_text that change clean captions (open_clip runs it before tokenizing);
# its mojibake repair is not reproduced, so doubly-encoded UTF-8 ("cafÃ©") stays as it is.
_FIXES = str.maketrans({
    **{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},  # curly single quotes
    **{c: '"' for c in range(0x201C, 0x2020)},  # curly double quotes
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st", "Ĳ": "IJ", "ĳ": "ij",
    0x3000: " ",  # ideographic space
    # fullwidth ASCII, halfwidth katakana and hangul -> their standard forms
    **{c: n for c in range(0xFF01, 0xFFF0) if (n := unicodedata.normalize("NFKC", chr(c))) != chr(c)},
    # C1 controls read as the Windows-1252 characters they usually were, as web browsers do
    **{c: ch for c in range(0x80, 0xA0) if (ch := bytes([c]).decode("cp1252", "ignore"))},
    # control characters nobody means to caption with (tabs and newlines are whitespace, kept)
    **{c: None for c in (*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                         *range(0xFFF9, 0xFFFD))},
})
_TERMINAL_ESCAPES = re.compile(r"\x1b\[[\d;]*[A-Za-z]")


def _fix(text: str) -> str:
    return unicodedata.normalize("NFC", _TERMINAL_ESCAPES.sub("", text).translate(_FIXES))


def _clean_clip(text: str, lowercase: bool = True) -> str:
    """open_clip's caption cleanup: text fixes, HTML entities decoded, whitespace collapsed, lowercase."""
    markup = "<" in text
    text = _fix(text)
    if not markup:
        # ftfy decodes entities in text without markup and fixes what they decode to, until nothing changes.
        while (decoded := _fix(html.unescape(text))) != text:
            text = decoded
    text = " ".join(html.unescape(html.unescape(text)).split())
    return text.lower() if lowercase else text


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise DataError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"text {i} is a {type(t).__name__}, not a string: {t!r}")
    return list(texts)


class TextTokenizer:
    """The interface every vitkit tokenizer has (subclasses: CLIP BPE, SentencePiece, trained BPE)."""

    kind = ""
    sot_id: int | None = None
    eot_id: int
    pad_id: int
    vocab_size: int
    context_length: int

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, without start, end or padding."""
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _file_config(self, directory: Path) -> dict:
        """Write the vocabulary into ``directory``; return the config keys that name it (relative)."""
        raise NotImplementedError

    def encode(self, texts: str | list[str], context_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids (N, L) int64, mask (N, L) bool: True at the start, text and end tokens, False at padding)."""
        texts = _as_texts(texts)
        length = int(context_length or self.context_length)
        specials = 1 + (self.sot_id is not None)
        if length < specials:
            raise ConfigError(f"context_length {length} leaves no room for the start and end tokens")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        head = [] if self.sot_id is None else [self.sot_id]
        for i, row in enumerate(self.encode_ids(texts)):
            seq = head + row + [self.eot_id]
            if len(seq) > length:
                seq = seq[:length]
                seq[-1] = self.eot_id
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = True
        return ids, mask

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Texts -> (N, context_length) int64 ids, padded with ``pad_id``; long texts keep their end token."""
        return self.encode(texts, context_length)[0]

    def decode(self, ids) -> str:
        """One row of ids -> its text (cleaned as tokenized): from after the start token to the first end token."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if ids and self.sot_id is not None and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self._decode(ids)

    def to_config(self) -> dict:
        """A JSON-able dict that ``load_tokenizer`` rebuilds this tokenizer from."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer_config.json`` and the vocabulary into ``directory``; ``load_tokenizer(directory)`` reads them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in {**self.to_config(), **self._file_config(directory)}.items() if v is not None}
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return directory

    def __reduce__(self):
        # Pickling and deepcopy (EMA copies of a model caching its tokenizer) rebuild from the config.
        return load_tokenizer, (self.to_config(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length})"


def find_clip_vocab() -> Path:
    """The path of CLIP's BPE vocabulary shipped in the installed open_clip wheel (open_clip is not imported)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / CLIP_VOCAB
        if path.is_file():
            return path
    raise ConfigError(
        f"CLIP's BPE vocabulary {CLIP_VOCAB} was not found: install it with `pip install open_clip_torch`, or "
        f"download {CLIP_VOCAB_URL} and pass its path as vocab_path"
    )


@lru_cache(maxsize=4)
def _clip_backend(path: str):
    """A ``tokenizers.Tokenizer`` for CLIP's BPE from its merges file (.txt.gz / .txt) or a saved tokenizer.json."""
    tk = _tokenizers()
    if path.endswith(".json"):
        try:
            return tk.Tokenizer.from_file(path)
        except Exception as e:
            raise ConfigError(f"{path} is not a tokenizer.json written by ClipTokenizer.save: {e}") from e
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ConfigError(f"cannot read CLIP's BPE vocabulary {path}: {e}") from e
    # The first line is a version header; open_clip uses the first 48894 merges after it.
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_MERGES + 1] if line.strip()]
    if not merges or any(len(m) != 2 for m in merges):
        raise ConfigError(f"{path} is not a BPE merges file (one 'a b' pair per line); expected {CLIP_VOCAB}")
    # The byte-level alphabet sorted by code point is exactly CLIP's byte order (printable bytes map to
    # themselves, the rest to U+0100 onward, both ascending).
    alphabet = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConfigError(f"{path} repeats a merge; expected CLIP's {CLIP_VOCAB}")
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # The end-of-word mark decodes to a space: swap it for the byte-level space, then undo the byte map.
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("</w>", "\u0120"), tk.decoders.ByteLevel()])
    # Specials in a caption's text become the special ids, as in CLIP's pattern.
    tok.add_special_tokens([SOT, EOT])
    return tok


class ClipTokenizer(TextTokenizer):
    """OpenAI CLIP's byte-level BPE (open_clip's ``SimpleTokenizer``): 49408 ids, start 49406, end 49407, pad 0.

    Texts are cleaned as open_clip does (HTML entities, whitespace, lowercase; of ftfy's fixes the
    quotes, ligatures, character widths, control characters and NFC, not its mojibake repair).
    ``vocab_path``: CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (or a ``tokenizer.json`` written by
    :meth:`save`); None finds the copy the ``open_clip_torch`` wheel ships.
    """

    kind = "clip_bpe"

    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 77):
        if vocab_path is not None and not Path(vocab_path).is_file():
            raise PathNotFoundError(f"CLIP BPE vocabulary {vocab_path} does not exist; omit vocab_path to use "
                                    f"open_clip's, or download {CLIP_VOCAB_URL}")
        self.vocab_path = None if vocab_path is None else str(Path(vocab_path).resolve())
        self._tok = _clip_backend(self.vocab_path or str(find_clip_vocab()))
        self.sot_id, self.eot_id = self._tok.token_to_id(SOT), self._tok.token_to_id(EOT)
        if self.sot_id is None or self.eot_id is None:
            raise ConfigError(f"{vocab_path} lacks CLIP's {SOT} and {EOT} tokens")
        self.pad_id = 0
        self.vocab_size = self._tok.get_vocab_size()
        self.context_length = int(context_length)

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        cleaned = [_clean_clip(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(cleaned, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def to_config(self) -> dict:
        return {"kind": self.kind, "vocab_path": self.vocab_path, "context_length": self.context_length}

    def _file_config(self, directory: Path) -> dict:
        self._tok.save(str(directory / "tokenizer.json"))
        return {"vocab_path": "tokenizer.json"}


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece vocabulary as SigLIP uses it (HF ``SiglipTokenizer``, big_vision): no start token,
    the end token appended and kept on truncation, padded with the end token by default.

    ``lowercase`` and ``canonicalize`` (strip ASCII punctuation, collapse whitespace) are what HF's
    SiglipTokenizer and open_clip apply before the SentencePiece model. ``source`` says where the
    model file comes from, for the error when it is missing.
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike | None, context_length: int = 64, lowercase: bool = True,
                 canonicalize: bool = True, pad_id: int | None = None, eot_id: int | None = None,
                 source: str | None = None):
        where = f" (from {source})" if source else ""
        if model_path is None or not Path(model_path).is_file():
            name = "its SentencePiece model file" if model_path is None else str(model_path)
            raise ConfigError(f"this tokenizer needs {name}{where}, which is not available offline: download it "
                              f"and pass its path as model_path")
        spm = _sentencepiece()
        self.model_path, self.source = str(Path(model_path).resolve()), source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{model_path} is not a SentencePiece model: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        if eot_id is None:
            eot_id = self._sp.eos_id()
            if eot_id < 0:
                raise ConfigError(f"{model_path} has no end-of-sequence piece; pass eot_id")
        self.eot_id = int(eot_id)
        self.pad_id = self.eot_id if pad_id is None else int(pad_id)
        for name, value in (("eot_id", self.eot_id), ("pad_id", self.pad_id)):
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary of {self.vocab_size} pieces")
        self.lowercase, self.canonicalize = lowercase, canonicalize
        self.context_length = int(context_length)

    def _prepare(self, text: str) -> str:
        text = text.replace("\u2581", " ")  # the SentencePiece space mark is a space in the input
        if self.lowercase:
            text = text.lower()
        if self.canonicalize:
            text = text.translate(_NO_PUNCTUATION)
        return re.sub(r"\s+", " ", text).strip()

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode([self._prepare(t) for t in texts], out_type=int)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def to_config(self) -> dict:
        return {"kind": self.kind, "model_path": self.model_path, "context_length": self.context_length,
                "lowercase": self.lowercase, "canonicalize": self.canonicalize, "pad_id": self.pad_id,
                "eot_id": self.eot_id, "source": self.source}

    def _file_config(self, directory: Path) -> dict:
        (directory / "spiece.model").write_bytes(self._sp.serialized_model_proto())
        return {"model_path": "spiece.model"}


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


class CaptionBpeTokenizer(TextTokenizer):
    """A byte-level BPE trained on your captions by :func:`train_caption_tokenizer`.

    Ids 0, 1, 2 are ``<pad>``, ``<start_of_text>``, ``<end_of_text>`` (so a text tower over it pools
    with ``pool="eot", eot_id=2``). Any text encodes (byte-level: no unknown token); captions are
    cleaned as CLIP's are. Built from a ``tokenizer.json`` file or the same JSON as a string.
    """

    kind = "trained_bpe"

    def __init__(self, tokenizer_file: str | os.PathLike | None = None, *, tokenizer_json: str | None = None,
                 context_length: int = 32, lowercase: bool = True):
        tk = _tokenizers()
        if (tokenizer_file is None) == (tokenizer_json is None):
            raise ConfigError("CaptionBpeTokenizer needs exactly one of tokenizer_file and tokenizer_json")
        if tokenizer_file is not None and not Path(tokenizer_file).is_file():
            raise PathNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
        try:
            self._tok = (tk.Tokenizer.from_file(str(tokenizer_file)) if tokenizer_json is None
                         else tk.Tokenizer.from_str(tokenizer_json))
        except Exception as e:
            raise ConfigError(f"not a tokenizer.json ({tokenizer_file or 'tokenizer_json'}): {e}") from e
        ids = [self._tok.token_to_id(t) for t in (PAD, SOT, EOT)]
        if None in ids:
            raise ConfigError(f"{tokenizer_file or 'tokenizer_json'} lacks the {PAD}, {SOT} and {EOT} tokens; "
                              f"train one with train_caption_tokenizer")
        self.pad_id, self.sot_id, self.eot_id = ids
        self.vocab_size = self._tok.get_vocab_size()
        self.context_length, self.lowercase = int(context_length), lowercase

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        cleaned = [_clean_clip(t, self.lowercase) for t in texts]
        return [e.ids for e in self._tok.encode_batch(cleaned, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def to_config(self) -> dict:
        # The vocabulary travels inline so that a model file's metadata alone rebuilds it.
        return {"kind": self.kind, "tokenizer_json": self._tok.to_str(), "context_length": self.context_length,
                "lowercase": self.lowercase}

    def _file_config(self, directory: Path) -> dict:
        self._tok.save(str(directory / "tokenizer.json"))
        return {"tokenizer_file": "tokenizer.json", "tokenizer_json": None}  # the file replaces the inline copy


def train_caption_tokenizer(captions: list[str], vocab_size: int = 4096, context_length: int = 32, *,
                            min_frequency: int = 2, lowercase: bool = True) -> CaptionBpeTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids on ``captions`` (pairs seen fewer than
    ``min_frequency`` times are not merged). Small caption sets give fewer ids: read ``vocab_size``."""
    tk = _tokenizers()
    captions = _as_texts(captions)
    if not any(c.strip() for c in captions):
        raise DataError("no captions to train a tokenizer on")
    alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 3:
        raise ConfigError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                          f"{len(alphabet) + 3} ids (256 bytes and 3 special tokens)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                     special_tokens=[PAD, SOT, EOT], initial_alphabet=alphabet)
    tok.train_from_iterator([_clean_clip(c, lowercase) for c in captions], trainer=trainer)
    return CaptionBpeTokenizer(tokenizer_json=tok.to_str(), context_length=context_length, lowercase=lowercase)


_KINDS = {"clip_bpe": ClipTokenizer, "sentencepiece": SentencePieceTokenizer, "trained_bpe": CaptionBpeTokenizer}
# Config keys that name a file: relative to the folder of the tokenizer_config.json they come from.
_FILE_KEYS = ("vocab_path", "model_path", "tokenizer_file")


def _read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise PathNotFoundError(f"no tokenizer at {path}: expected a folder with {CONFIG_FILE} (written by "
                                f"tokenizer.save) or that file")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file} is not a tokenizer config: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file} is not a tokenizer config: expected a JSON object")
    for key in _FILE_KEYS:
        if isinstance(cfg.get(key), str):
            cfg[key] = str(file.parent / cfg[key])
    return cfg


def load_tokenizer(cfg: dict | str | os.PathLike, *, context_length: int | None = None) -> TextTokenizer:
    """A tokenizer from a ``to_config()`` dict or a folder written by ``save`` (its ``tokenizer_config.json``).

    ``cfg["kind"]`` is ``"clip_bpe"``, ``"sentencepiece"`` or ``"trained_bpe"``; the other keys are
    that tokenizer's arguments. ``context_length`` overrides the config's.
    """
    if isinstance(cfg, (str, os.PathLike)):
        cfg = _read_config(cfg)
    if not isinstance(cfg, dict):
        raise ConfigError(f"a tokenizer config is a dict or a folder, got {type(cfg).__name__}")
    args = dict(cfg)
    kind = args.pop("kind", None)
    if kind not in _KINDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(_KINDS)}")
    cls = _KINDS[kind]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(f"unknown keys {unknown} in a {kind} tokenizer config; valid keys: {', '.join(valid)}")
    if context_length is not None:
        args["context_length"] = context_length
    return cls(**args)
