"""Tokenizers: CLIP's BPE against open_clip's, SentencePiece against HF's SiglipTokenizer, a trained byte-level
BPE, and the config / folder round trips a run directory relies on."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys

import pytest
import torch
from helpers import lazy_peer

from vitkit.errors import ConfigError, DataError, PathNotFoundError
from vitkit.text import (
    CaptionBpeTokenizer,
    ClipTokenizer,
    SentencePieceTokenizer,
    find_clip_vocab,
    load_tokenizer,
    train_caption_tokenizer,
)

open_clip = lazy_peer("open_clip")
transformers = lazy_peer("transformers")
spm = lazy_peer("sentencepiece")

pytestmark = pytest.mark.peer("tokenizers")

CAPTIONS = [
    "A photo of a cat.",
    "Two dogs playing in the snow!!! 🐶❄️",
    "The 3 kids' toys cost $12.50 - what a deal?",
    "Café naïve résumé, Ünïcödé ÀÉÎ and Straße",
    "  lots   of\twhitespace\nand  newlines  ",
    "HTML &amp; entities &lt;b&gt; and &quot;quoted&quot; &amp;amp; twice",
    "a <b>bold</b> tag &amp; an entity",
    "“Curly quotes” and ‘single’ ones, ﬁne ligatures, ＦＵＬＬＷＩＤＴＨ letters",
    "日本語のキャプション、中文标题 and 한국어 text",
    "it's they're we've I'm you'll he'd IT'S",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "UPPER lower MiXeD case",
    "control\x00chars\x07here and a bell, \x1b[31mred\x1b[0m text, a\u2028line\u0085break",
    "&ldquo;entity quotes&rdquo;, &amp;ldquo;twice&amp;rdquo; and ﬃ; halfwidth ｶﾞｷﾞ, nbsp\u00a0here, bom\ufeff",
    "emoji only 🎉🎉🎉 👩‍👩‍👧",
    "",
    "a<end_of_text>b and <start_of_text>",
    "an old man walking his dog along a long sandy beach at sunset " * 8,
]


@pytest.fixture(scope="module")
def clip_tok():
    return ClipTokenizer()


@pytest.mark.peer("open_clip")
def test_clip_tokenizer_matches_open_clip(clip_tok):
    ours = clip_tok(CAPTIONS)
    assert ours.shape == (len(CAPTIONS), 77) and ours.dtype == torch.long
    assert torch.equal(ours, open_clip.tokenize(CAPTIONS))
    # A short context truncates most captions: the end token stays last, as in open_clip.
    theirs = open_clip.SimpleTokenizer(context_length=10)
    assert torch.equal(clip_tok(CAPTIONS, context_length=10), theirs(CAPTIONS))
    assert (clip_tok(CAPTIONS, context_length=10)[:, -1] == 49407).sum() >= 10
    assert (clip_tok.vocab_size, clip_tok.sot_id, clip_tok.eot_id, clip_tok.pad_id) == (49408, 49406, 49407, 0)
    for caption, row in zip(CAPTIONS[:12], ours[:12]):
        ids = row[1 : row.tolist().index(49407)].tolist()
        assert clip_tok.decode(row) == theirs.decode(ids).strip(), caption


@pytest.mark.peer("open_clip")
def test_clip_vocab_is_found_without_importing_open_clip():
    assert find_clip_vocab().samefile(open_clip.tokenizer.default_bpe())
    code = ("import sys; from vitkit.text import ClipTokenizer; ids = ClipTokenizer(context_length=8)('a dog'); "
            "assert 'open_clip' not in sys.modules, 'open_clip was imported'; print(ids.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(open_clip.tokenize(["a dog"], context_length=8).tolist())


def test_clip_vocab_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # find_spec then reports it absent
    with pytest.raises(ConfigError, match=r"pip install open_clip_torch.*bpe_simple_vocab_16e6\.txt\.gz"):
        find_clip_vocab()
    with pytest.raises(PathNotFoundError, match="nowhere.txt.gz does not exist"):
        ClipTokenizer(tmp_path / "nowhere.txt.gz")
    bad = tmp_path / "bad.txt"
    bad.write_text("#version\nnot-a-merge-line with three\n")
    with pytest.raises(ConfigError, match="not a BPE merges file"):
        ClipTokenizer(bad)


def test_clip_tokenizer_round_trips_and_mask(clip_tok, tmp_path):
    ids, mask = clip_tok.encode(["a dog", "a cat on a mat"], context_length=12)
    assert mask.sum(1).tolist() == [4, 7]  # start, words, end
    assert torch.equal(ids[~mask], torch.zeros(int((~mask).sum()), dtype=torch.long))
    saved = load_tokenizer(clip_tok.save(tmp_path / "tok"))
    assert isinstance(saved, ClipTokenizer) and (tmp_path / "tok" / "tokenizer.json").is_file()
    assert torch.equal(saved(CAPTIONS), clip_tok(CAPTIONS))
    rebuilt = load_tokenizer(clip_tok.to_config(), context_length=20)
    assert rebuilt.context_length == 20 and torch.equal(rebuilt(CAPTIONS), clip_tok(CAPTIONS, context_length=20))
    for twin in (copy.deepcopy(clip_tok), pickle.loads(pickle.dumps(clip_tok))):
        assert torch.equal(twin(CAPTIONS), clip_tok(CAPTIONS))


def test_bad_inputs_and_configs_are_clear_errors(clip_tok, tmp_path):
    with pytest.raises(DataError, match="text 1 is a int"):
        clip_tok(["fine", 3])
    with pytest.raises(DataError, match="string or a list of strings"):
        clip_tok(None)
    with pytest.raises(ConfigError, match="no room"):
        clip_tok("a dog", context_length=1)
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer({"kind": "wordpiece"})
    with pytest.raises(ConfigError, match=r"unknown keys \['lowercase'\] in a clip_bpe"):
        load_tokenizer({"kind": "clip_bpe", "lowercase": True})
    with pytest.raises(PathNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


# --- SentencePiece (SigLIP) ---------------------------------------------------------------------

SP_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "two dogs playing in the snow near a wooden fence",
    "a man riding a bicycle down a busy city street",
    "children playing football in a green park",
    "a bowl of fresh fruit on a kitchen table",
    "the sun setting over the ocean with small boats",
    "a woman reading a book in a quiet library",
    "three birds flying over a mountain lake",
] * 4


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model laid out like SigLIP's T5 vocabulary: pad 0, end 1, unknown 2, no start."""
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_writer=buf, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
    )
    path.write_bytes(buf.getvalue())
    return path


SP_TEXTS = [
    "A photo of a cat.",
    "Two DOGS playing, in the snow!!!",
    "a man riding   a bicycle\tdown a busy street?",
    "Unseen words: zebra xylophone; qué tal",
    "children playing football in a green park with a bowl of fresh fruit on a kitchen table at sunset",
    "the sun (setting) over the ocean - with small boats...",
]


@pytest.mark.peer("sentencepiece", "transformers")
def test_sentencepiece_matches_hf_siglip_tokenizer(sp_model):
    ours = SentencePieceTokenizer(sp_model, context_length=16)
    hf = transformers.SiglipTokenizer(vocab_file=str(sp_model))
    theirs = hf(SP_TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(SP_TEXTS), theirs)
    assert (ours.eot_id, ours.pad_id, ours.sot_id) == (1, 1, None)
    assert (ours(SP_TEXTS)[4] != 1).sum() == 15  # truncated: 15 pieces, then the end token


@pytest.mark.peer("sentencepiece")
def test_sentencepiece_round_trips_and_missing_vocab(sp_model, tmp_path):
    tok = SentencePieceTokenizer(sp_model, context_length=24)
    assert tok.decode(tok("A photo of a cat!")[0]) == "a photo of a cat"
    saved = load_tokenizer(tok.save(tmp_path / "sp"))
    assert isinstance(saved, SentencePieceTokenizer) and (tmp_path / "sp" / "spiece.model").is_file()
    assert torch.equal(saved(SP_TEXTS), tok(SP_TEXTS))
    assert torch.equal(copy.deepcopy(tok)(SP_TEXTS), tok(SP_TEXTS))
    cfg = {**tok.to_config(), "model_path": str(tmp_path / "gone" / "spiece.model"), "source": "a SigLIP checkpoint"}
    with pytest.raises(ConfigError, match=r"gone/spiece\.model \(from a SigLIP checkpoint\).*not available offline"):
        load_tokenizer(cfg)
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        (tmp_path / "junk.model").write_bytes(b"not a model")
        SentencePieceTokenizer(tmp_path / "junk.model")


# --- BPE trained on the captions -----------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow"]


def _shape_captions() -> list[str]:
    out = []
    for i, s in enumerate(SHAPES):
        for j, c in enumerate(COLOURS):
            out.append(f"A {c} {s} on a {COLOURS[(i + j + 1) % 4]} background.")
            out.append(f"a picture of a {c} {s}")
    return out


def test_trained_bpe_tokenizer(tmp_path):
    captions = _shape_captions()
    tok = train_caption_tokenizer(captions, vocab_size=400, context_length=16)
    assert isinstance(tok, CaptionBpeTokenizer)
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    assert 256 + 3 < tok.vocab_size <= 400
    ids, mask = tok.encode(captions)
    assert (ids[:, 0] == 1).all() and (ids.max() < tok.vocab_size)
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(ids)), lengths - 1] == 2).all() and (ids[~mask] == 0).all()
    # Byte-level: every caption decodes back to its cleaned text, and so does text never seen in training.
    for caption, row in zip(captions, ids):
        assert tok.decode(row) == " ".join(caption.lower().split())
    unseen = "Ünïcödé 🎉 zebra #42"
    assert tok.decode(tok(unseen, context_length=64)[0]) == unseen.lower()
    # Words seen 16 times or more become single ids (the point of BPE).
    for word in SHAPES + COLOURS + ["background"]:
        assert len(tok.encode_ids([word])[0]) == 1, word
    long = tok("a red circle " * 20)[0]
    assert long.shape == (16,) and long[-1] == 2 and (long != 0).all()
    # Round trips: the folder a run saves, the inline config a model file carries, a deepcopy.
    for twin in (load_tokenizer(tok.save(tmp_path / "bpe")), load_tokenizer(tok.to_config()), copy.deepcopy(tok)):
        assert isinstance(twin, CaptionBpeTokenizer) and torch.equal(twin(captions), tok(captions))
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    assert "tokenizer_json" not in (tmp_path / "bpe" / "tokenizer_config.json").read_text()
    # Training is deterministic.
    assert train_caption_tokenizer(captions, vocab_size=400).to_config() == {**tok.to_config(), "context_length": 32}


def test_trained_bpe_bad_inputs():
    with pytest.raises(DataError, match="no captions"):
        train_caption_tokenizer(["", "  "])
    with pytest.raises(ConfigError, match="vocab_size 100 is too small"):
        train_caption_tokenizer(["a dog"], vocab_size=100)
    with pytest.raises(ConfigError, match="exactly one of"):
        CaptionBpeTokenizer()


def _reference_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE encoding as Sennrich et al. define it: merge the adjacent pair learned earliest until none is left."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def test_trained_bpe_encodes_like_reference_bpe():
    tok = train_caption_tokenizer(_shape_captions(), vocab_size=300)
    model = json.loads(tok.to_config()["tokenizer_json"])["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ranks = {pair: r for r, pair in enumerate(merges)}
    text = "a yellow star on a red background with zebras and circles"
    # Plain lowercase words: byte-level pre-tokenization gives each its leading space as "\u0120".
    expected = [model["vocab"][s] for w in text.split() for s in _reference_bpe(list("\u0120" + w), ranks)]
    assert tok.encode_ids([text.upper()])[0] == expected
    assert len(expected) > len(text.split())  # the unseen words are split into pieces
