"""Streaming detokenization: deltas add up to decode(output_ids), cut at the first stop string."""

from __future__ import annotations

import random

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.loader.tokenizer import Tokenizer

MULTIBYTE = "Hi 😀中文👩‍👩‍👧‍👦 café مرحبا 🇫🇷 日本語 ok"


@pytest.fixture(scope="module")
def byte_level(model_path):
    """The real SmolLM2 tokenizer: byte-level BPE, whose tokens can end inside a character."""
    return Tokenizer.from_gguf(model_path)


class Windowed:
    """A tokenizer seen through the detokenizer's protocol alone (no byte_pieces): the window
    decodes every tokenizer can take, counted."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.calls = tok, []
        self.special_token_ids, self.byte_token_ids = tok.special_token_ids, tok.byte_token_ids

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens)

    def encode(self, text, add_special_tokens=True):  # for the tests' own use
        return self.tok.encode(text, add_special_tokens)

    @property
    def vocab_size(self):
        return self.tok.vocab_size


@pytest.fixture(scope="module")
def byte_level_windowed(byte_level):
    return Windowed(byte_level)


@pytest.fixture(scope="module")
def sentencepiece():
    """A small SentencePiece-style tokenizer: "▁" spaces, byte fallback, leading-space strip."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)),
              "▁", "▁▁", "▁hello", "▁world", "hello", "world", "▁foo", "foo", "!", "a", "b", "▁a", "é"]
    vocab = {p: i for i, p in enumerate(pieces)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = [tokenizers.AddedToken(t, special=True, normalized=False) for t in pieces[:3]]
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(tok, ids, *, chunks=None, skip=True, stop=(), include=False, prompt=(1, 2, 3)):
    """Feed `ids` in chunks; return (deltas, detokenizer). Stops feeding after a stop string."""
    detok = IncrementalDetokenizer(tok, list(prompt), skip, list(stop), include)
    deltas, i = [], 0
    chunks = chunks or [1] * len(ids)
    for n in chunks:
        if i >= len(ids) or detok.stop_reason is not None:
            break
        deltas.append(detok.update(ids[i : i + n]))
        i += n
    if detok.stop_reason is None:
        if i < len(ids):
            deltas.append(detok.update(ids[i:]))
        deltas.append(detok.finish())
    return deltas, detok


def expected_text(full: str, stops, include: bool) -> tuple[str, str | None]:
    """The reference: the stop string that ends first in the full text (ties: the longer one)."""
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s and s in full]
    if not hits:
        return full, None
    end, start, stop = min(hits)
    return full[: end if include else start], stop


# -- text equals decode(ids) -------------------------------------------------------------------


def test_multibyte_characters_are_never_split(byte_level):
    ids = byte_level.encode(MULTIBYTE)
    pieces = [byte_level.decode([t]) for t in ids]
    assert any(p.endswith("\ufffd") for p in pieces), (
        "the text should have tokens ending mid-character"
    )
    deltas, detok = stream(byte_level, ids)
    assert "".join(deltas) == detok.text == byte_level.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # held back while a character was incomplete


def test_first_token_spacing_is_that_of_decode(byte_level, sentencepiece):
    ids = byte_level.encode(" Hello world")
    assert "".join(stream(byte_level, ids)[0]) == " Hello world"
    sp = [sentencepiece.backend.token_to_id(t) for t in ("▁hello", "▁world", "!")]
    assert "".join(stream(sentencepiece, sp)[0]) == sentencepiece.decode(sp) == "hello world!"


def test_skipped_special_tokens_keep_the_next_space(sentencepiece):
    v = sentencepiece.backend.token_to_id
    ids = [v("▁hello"), v("</s>"), v("<s>"), v("▁world"), v("<0xC3>"), v("<0xA9>"), v("▁foo")]
    for skip in (True, False):
        assert "".join(stream(sentencepiece, ids, skip=skip)[0]) == sentencepiece.decode(
            ids, skip_special_tokens=skip
        )
    assert sentencepiece.decode(ids) == "hello worldé foo"


def test_byte_fallback_runs_are_decoded_whole(sentencepiece):
    """A byte run is text only as a whole: <0xC3><0xA9> is "é", with <0xFF> after it "���"."""
    v = sentencepiece.backend.token_to_id
    for tail in ([v("<0xFF>")], [v("a")], []):
        ids = [v("▁a"), v("<0xC3>"), v("<0xA9>"), *tail]
        assert "".join(stream(sentencepiece, ids)[0]) == sentencepiece.decode(ids)


def _random_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """Mostly tokens of multi-byte text (shuffled: characters get cut), some random or special."""
    pool = (
        tok.encode(MULTIBYTE * 2, add_special_tokens=False)
        + sorted(tok.special_token_ids)
        + sorted(tok.byte_token_ids)
    )
    return [
        rng.choice(pool) if rng.random() < 0.8 else rng.randrange(tok.vocab_size) for _ in range(n)
    ]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    which=st.sampled_from(["byte_level", "byte_level_windowed", "sentencepiece"]),
    skip=st.booleans(),
)
def test_streamed_text_equals_decode(request, seed, n, which, skip):
    tok = request.getfixturevalue(which)
    rng = random.Random(seed)
    ids = _random_ids(tok, rng, n)
    chunks = [rng.randint(1, 3) for _ in ids]
    deltas, detok = stream(tok, ids, chunks=chunks, skip=skip)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert detok.stop_reason is None
    deferred = IncrementalDetokenizer(tok, [1, 2, 3], skip, incremental=False)  # decoded once, at finish
    assert [deferred.update(ids[i : i + 3]) for i in range(0, len(ids), 3)] == [""] * len(range(0, len(ids), 3))
    assert deferred.finish() == deferred.text == detok.text


def test_work_per_token_is_bounded(byte_level):
    """Each step decodes a window of a few tokens, not the whole output; a byte-level tokenizer
    with its byte pieces decodes nothing."""
    counting = Windowed(byte_level)
    ids = byte_level.encode(("The quick brown fox jumps over the lazy dog. " + MULTIBYTE) * 40)
    deltas, _ = stream(counting, ids)
    assert "".join(deltas) == byte_level.decode(ids)
    assert len(ids) > 1000 and max(counting.calls) <= 8 and len(counting.calls) <= 2 * len(ids) + 2

    class Pieces(Windowed):
        def byte_pieces(self, skip_special_tokens=True):
            return self.tok.byte_pieces(skip_special_tokens)

    counting = Pieces(byte_level)
    deltas, _ = stream(counting, ids)
    assert "".join(deltas) == byte_level.decode(ids) and counting.calls == []


def test_byte_pieces_concatenate_to_decode(byte_level, sentencepiece):
    """decode(ids) is the lossy UTF-8 decoding of the tokens' byte pieces joined, for any ids
    (cut characters, special tokens kept or skipped, ids past the vocabulary); tokenizers whose
    decoder does more than map bytes have none."""
    rng = random.Random(0)
    n = byte_level.vocab_size
    for skip in (True, False):
        pieces = byte_level.byte_pieces(skip)
        assert len(pieces) == n and pieces is byte_level.byte_pieces(skip)  # built once
        for _ in range(500):
            ids = _random_ids(byte_level, rng, rng.randint(1, 12))
            joined = b"".join(pieces[t] if t < n else b"" for t in ids).decode("utf-8", "replace")
            assert joined == byte_level.decode(ids, skip_special_tokens=skip), ids
    assert byte_level.byte_pieces(True)[byte_level.eos_token_id] == b""
    assert byte_level.byte_pieces(False)[byte_level.eos_token_id] == b"<|im_end|>"  # the instruct model's eos
    assert sentencepiece.byte_pieces() is None
    cleaned = Tokenizer(byte_level.backend, bos_token=None, eos_token=None, clean_up_tokenization_spaces=True)
    assert cleaned.byte_pieces() is None  # " ." -> "." is not a per-token map


@pytest.mark.parametrize("which", ["byte_level", "byte_level_windowed"])
def test_ids_past_the_vocabulary_add_no_text(request, byte_level, which):
    """A model's vocabulary can be wider than its tokenizer's: such ids add nothing, as in decode."""
    ids = [*byte_level.encode("Hi 😀"), byte_level.vocab_size + 5, *byte_level.encode(" there")]
    deltas, detok = stream(request.getfixturevalue(which), ids)
    assert "".join(deltas) == detok.text == byte_level.decode(ids) == "Hi 😀 there"


# -- stop strings ---------------------------------------------------------------------------------


def test_stop_string_is_never_emitted(byte_level):
    ids = byte_level.encode("Thought: easy.\nObservation: 42\nmore text")
    stop = "Observation:"
    assert len(byte_level.encode(stop)) > 1  # the stop string spans several tokens
    deltas, detok = stream(byte_level, ids, stop=[stop])
    emitted = ""
    for d in deltas:
        emitted += d
        assert "Obs" not in emitted
    assert detok.text == emitted == "Thought: easy.\n"
    assert detok.stop_reason == stop
    assert detok.update(byte_level.encode(" ignored")) == "" and detok.finish() == ""
    assert detok.text == "Thought: easy.\n"


def test_include_stop_str_in_output(byte_level):
    ids = byte_level.encode("a, b, c, STOP here")
    deltas, detok = stream(byte_level, ids, stop=["STOP"], include=True)
    assert "".join(deltas) == detok.text == "a, b, c, STOP"
    assert detok.stop_reason == "STOP"


def test_held_back_tail_is_flushed_at_the_end(byte_level):
    ids = byte_level.encode("The answer is Obs")
    detok = IncrementalDetokenizer(byte_level, [], True, ["Observation"], False)
    streamed = "".join(detok.update([t]) for t in ids)
    assert streamed == detok.text == "The answer is "
    assert detok.finish() == "Obs"
    assert detok.text == "The answer is Obs" and detok.stop_reason is None


def test_stop_that_completes_first_wins(byte_level):
    ids = byte_level.encode("x = 1; y = 2;")
    _, detok = stream(byte_level, ids, chunks=[len(ids)], stop=["= 2", "y = 2;", "1;"])
    assert (detok.text, detok.stop_reason) == ("x = ", "1;")
    _, detok = stream(byte_level, ids, chunks=[len(ids)], stop=["xyz", "y = 2", "= 2"])
    assert (detok.text, detok.stop_reason) == ("x = 1; ", "y = 2")  # same end: the longer one


def test_stop_string_inside_a_multibyte_character_run(byte_level):
    ids = byte_level.encode("ab😀cd")
    deltas, detok = stream(byte_level, ids, stop=["😀"])
    assert "".join(deltas) == detok.text == "ab" and detok.stop_reason == "😀"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    include=st.booleans(),
    which=st.sampled_from(["byte_level", "byte_level_windowed", "sentencepiece"]),
)
def test_stop_strings_match_the_reference(request, seed, include, which):
    tok = request.getfixturevalue(which)
    rng = random.Random(seed)
    ids = _random_ids(tok, rng, rng.randint(1, 30))
    full = tok.decode(ids)
    stops = []
    for _ in range(rng.randint(1, 3)):
        if full and rng.random() < 0.8:
            i = rng.randrange(len(full))
            stops.append(full[i : i + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(["zzz", "Hi 😀", "中", "\n"]))
    deltas, detok = stream(
        tok, ids, chunks=[rng.randint(1, 3) for _ in ids], stop=stops, include=include
    )
    text, reason = expected_text(full, stops, include)
    assert "".join(deltas) == detok.text == text
    assert detok.stop_reason == reason
