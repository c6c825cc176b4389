"""The tokenizer must give Hugging Face transformers' ids, text and prompts for the same model file.

The reference is computed live: `AutoTokenizer.from_pretrained(dir, gguf_file=name)` on the real
SmolLM2 GGUF, on small GGUF files written here (other pre-tokenizer flavours, BOS on, a
SentencePiece vocabulary), and on a Hugging Face directory saved from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.loader.chat_template import render_chat_template
from tokenmill.loader.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see.",
    "  leading spaces, trailing spaces   ",
    "runs     of      spaces\n\n\nand\r\nnewlines\n",
    "def f(x):\n\treturn x ** 2  # tab-indented\n\n    if y:\n        z = [1, 2, 3]\n",
    "Numbers: 0 7 42 123 4567 89012 3.14159 -1e10 1,000,000 +44  20  7",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Accents: café, naïve, Ünïcödé, façade, Ångström, Dvořák",
    "RTL: مرحبا بالعالم — שלום עולם",
    "Emoji 😀🎉 family 👩‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽 keycap 1️⃣",
    "Special text: <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_end|><repo_name>x<filename>y.py",
    "<|im_start|",  # not a whole special token
    "Mixed\u00a0nbsp\u200bzero-width\ufeffbom \x00nul \x7f del",
    "",
    " ",
    "\n",
    "'s 't 're 've 'm 'll 'd ’s don't I'M",
    "URL: https://example.com/a?b=1&c=%20 email: a.b@c.io",
    "a" * 300,
]

# Pieces the random text is salted with: the places where pre-tokenizers disagree.
TRICKY_PIECES = [" ", "  ", "\n", "\t", "0", "7", "'s", "é", "👩\u200d👧", "中", "<|im_end|>",
                 "<|im_start|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the 🐔 cross the road?"},
        {"role": "user", "content": "Why?\n\tNo idea."},
    ],
    [{"role": "user", "content": "日本語で答えて <|im_end|>", "name": None}],
]


def _hf_from_gguf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _pipeline(backend) -> dict:
    """Everything that decides ids and text: vocab, merges, pre-tokenizer, added tokens, ..."""
    return json.loads(backend.to_str())


def _assert_same_tokenization(ours: Tokenizer, hf, texts) -> None:
    for text in texts:
        for add in (True, False):
            ids = hf.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == ids, (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip
                ), (text, skip)


@pytest.fixture(scope="module")
def reader(model_path):
    return gguf.GGUFReader(model_path)


@pytest.fixture(scope="module")
def ours(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def hf(model_path):
    return _hf_from_gguf(model_path)


# -- the real model ---------------------------------------------------------------------------


def test_pipeline_equals_transformers(ours, hf):
    assert _pipeline(ours.backend) == _pipeline(hf.backend_tokenizer)


def test_encode_decode_equal_transformers(ours, hf):
    _assert_same_tokenization(ours, hf, CORPUS)


def test_decode_arbitrary_ids_equals_transformers(ours, hf):
    import random

    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 30))]
        ids.append(rng.randrange(17))  # a special token
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
    ids = [0, 1, 2, 19556]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            st.characters(codec="utf-8"),
            st.sampled_from(TRICKY_PIECES),
        ),
        max_size=60,
    ).map("".join)
)
def test_random_text_equals_transformers(ours, hf, text):
    ids = hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=False) == ids
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_stop_ids(ours, hf):
    # The file says bos=1 (<|im_start|>), eos=2 (<|im_end|>), add_bos_token=False: no BOS is added.
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert ours.pad_token_id == 2
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.encode("Hello") == hf.encode("Hello") == [19556]
    assert ours.stop_token_ids == {ours.eos_token_id, 0}  # <|im_end|> and <|endoftext|>
    assert ours.vocab_size == len(hf) == 49152
    assert ours.special_token_ids == set(range(17))
    assert ours.byte_token_ids == frozenset()


def test_chat_template_equals_transformers(ours, hf):
    for messages in CONVERSATIONS:
        for add in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
        ids = hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert ours.encode_chat(messages) == list(ids)


def test_from_path_equals_from_reader(model_path, ours):
    by_path = load_tokenizer(model_path)
    assert _pipeline(by_path.backend) == _pipeline(ours.backend)
    assert by_path.chat_template == ours.chat_template


def test_chat_template_environment():
    template = (
        "{% for m in messages %}"
        "{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ m | tojson }}{% generation %}<{{ bos_token }}>{% endgeneration %}\n{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% if i == 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }} {{ strftime_now('%Y') | length }} {{ dict(a=1).a }}"
    )
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "é<b>", "name": None}]
    out = render_chat_template(template, messages, bos_token="B")
    assert out == '{"role": "user", "content": "é<b>"}<B>2 4 1'  # trim_blocks ate the newline
    (expected,), _ = render_jinja_template(
        conversations=[[{"role": "user", "content": "é<b>"}]],
        chat_template=template,
        add_generation_prompt=True,
        bos_token="B",
    )
    assert out == expected
    with pytest.raises(Exception, match="no bad roles"):
        render_chat_template(template, [{"role": "bad", "content": ""}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox refuses attribute games
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat_template(template, [])


def test_no_chat_template_is_a_clear_error(ours):
    plain = Tokenizer(ours.backend, bos_token=None, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    assert plain.stop_token_ids == {0, 2}  # eos, plus the end-of-turn tokens the vocabulary has


# -- other files: GGUF flavours, SentencePiece, Hugging Face directories ------------------------


def _write_gguf(path: Path, kind: str, tokens, types, *, arch="llama", merges=None, scores=None,
                pre=None, bos=None, eos=None, unk=None, add_bos=None, chat_template=None) -> Path:
    """A GGUF holding only the tokenizer keys (and what transformers needs to read a config)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(2048)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_tokenizer_model(kind)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id),
                       (unk, w.add_unk_token_id)):
        if value is not None:
            add(value)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("pre", "add_bos"), [("llama-bpe", True), ("qwen2", False)])
def test_byte_level_flavours_equal_transformers(tmp_path, reader, pre, add_bos):
    """The SmolLM2 vocabulary under another split regex, and with BOS added."""
    fields = {
        k: reader.fields[f"tokenizer.ggml.{k}"].contents()
        for k in ("tokens", "token_type", "merges")
    }
    path = _write_gguf(tmp_path / "m.gguf", "gpt2", fields["tokens"], fields["token_type"],
                       merges=fields["merges"], pre=pre, bos=1, eos=2, add_bos=add_bos)
    ours, hf = Tokenizer.from_gguf(path), _hf_from_gguf(path)
    assert _pipeline(ours.backend) == _pipeline(hf.backend_tokenizer)
    _assert_same_tokenization(ours, hf, CORPUS)
    assert (ours.encode("hi")[0] == 1) is add_bos


@pytest.fixture(scope="module")
def sentencepiece_vocab():
    """A small SentencePiece BPE vocabulary with byte fallback, trained here (as in Llama 2)."""
    spm = pytest.importorskip("sentencepiece")
    import io

    lines = [*CORPUS, *(Path(__file__).read_text(encoding="utf-8").splitlines())] * 3
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=proto,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.99,
        user_defined_symbols=["<tool>"],
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    # GGUF token types, as llama.cpp's converter writes them.
    def gguf_type(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if tokens[i] == "<tool>" else 1

    types = [gguf_type(i) for i in range(len(tokens))]
    return tokens, scores, types


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sentencepiece_gguf_equals_transformers(tmp_path, sentencepiece_vocab, arch):
    tokens, scores, types = sentencepiece_vocab
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}"
        "{% endfor %}"
    )
    path = _write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, arch=arch, scores=scores,
                       bos=1, eos=2, unk=0, chat_template=template)
    ours, hf = Tokenizer.from_gguf(path), _hf_from_gguf(path)
    assert _pipeline(ours.backend) == _pipeline(hf.backend_tokenizer)
    _assert_same_tokenization(ours, hf, CORPUS)
    assert ours.encode("hi")[0] == 1  # llama files add BOS unless they say otherwise
    assert len(ours.byte_token_ids) == 256
    assert ours.stop_token_ids == {2}
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_hf_directory_equals_transformers(tmp_path, hf):
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True  # ignored beside tokenizer.json, by transformers and by us
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    ours, ref = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert _pipeline(ours.backend) == _pipeline(ref.backend_tokenizer)
    _assert_same_tokenization(ours, ref, CORPUS)
    assert ours.encode("x") == ref.encode("x") == [104]
    assert ours.stop_token_ids == {0, 2, 5}
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_unsupported_tokenizer_model_is_a_one_line_error(tmp_path, kind):
    path = _write_gguf(
        tmp_path / "bad.gguf", kind, ["<pad>", "a", "b"], [3, 1, 1], scores=[0.0, -1.0, -2.0]
    )
    with pytest.raises(
        ValueError, match=f"unsupported GGUF tokenizer: tokenizer.ggml.model='{kind}'"
    ) as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value) and "'gpt2'" in str(err.value)


def test_load_tokenizer_rejects_what_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
