"""Tokenizer from a GGUF file's metadata or a Hugging Face `tokenizer.json`.

The BPE itself is the Rust `tokenizers` library; this module only assembles its pipeline from
what the model file says, so that token ids are identical to Hugging Face transformers' for the
same file (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`, or the directory itself).

GGUF (`tokenizer.ggml.*` keys, built the way transformers' GGUF integration builds them):

    model "gpt2"  byte-level BPE: tokens + merges; the split regex comes from `tokenizer.ggml.pre`
                  (llama3 / llama-bpe, qwen2, tekken, gpt-4o, ...; any other flavour, "smollm" and
                  "gpt-2" included, gets the GPT-2 regex of ByteLevel)
    model "llama" SentencePiece BPE with byte fallback (Llama 2, Mistral): merges rebuilt from the
                  token scores when the file has none; Metaspace "▁" pre-tokenizer
    anything else -> ValueError naming the model and what is supported

Special tokens: tokens of type CONTROL become special (matched whole, dropped by
`skip_special_tokens`), USER_DEFINED ones plain added tokens, and bos/eos/unk/pad are special.
BOS/EOS are added by `encode(add_special_tokens=True)` only when the file says so
(`tokenizer.ggml.add_bos_token`, default on for "llama" files, off otherwise), as in transformers.

Known, deliberate difference from transformers: where the file lacks a token that transformers'
tokenizer classes assume (`<|endoftext|>` for byte-level, `<s>`/`</s>`/`<unk>` for SentencePiece),
transformers appends it as a new id past the model's vocabulary; we do not.

Known difference *with* transformers from llama.cpp: for pre flavour "smollm" (and "starcoder"
and the like) llama.cpp first splits off every digit, as the model's original tokenizer.json does;
transformers' GGUF path, and so this module, does not. Ids differ only where a run of 2+ spaces
precedes a digit ("x =  1": "Ġ","Ġ","1" here, "ĠĠ","1" there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from tokenmill.loader.chat_template import render_chat_template

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Split regexes per `tokenizer.ggml.pre` flavour (the same table as transformers' GGUF integration;
# the patterns are the original tokenizers'). Flavours not listed use ByteLevel's GPT-2 regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_FLAVOURS = {
    _LLAMA3_SPLIT: "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano "
    "dbrx smaug-bpe",
    _QWEN2_SPLIT: "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez",
    _QWEN35_SPLIT: "qwen35",
    _TEKKEN_SPLIT: "tekken",
    _GPT4O_SPLIT: "gpt-4o llama4 kanana2 talkie minimax-m2",
}
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    flavour: regex for regex, names in _SPLIT_FLAVOURS.items() for flavour in names.split()
}

SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")

# Tokens that end a turn or a text, by spelling: llama.cpp's end-of-generation list. Any of these
# the vocabulary has is a default stop token, beside eos. For chat models this stops at the end
# of the assistant turn even when the file names another eos (e.g. base <|endoftext|>); for plain
# models these tokens are end markers too, so stopping on them is right there as well.
END_OF_GENERATION_TOKENS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are spelled U+0100, U+0101, ... in byte order
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_SPELLING = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_SPELLING.values())
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces` (only when a tokenizer_config asks for it)."""
    for a, b in _CLEANUPS:
        text = text.replace(a, b)
    return text


def _generate_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens, best score first (transformers' `generate_merges`, which these must match)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _merge_pairs(merges: Iterable[str]) -> list[tuple[str, str]]:
    """GGUF spells a merge "Ġ t": the two tokens, one space apart."""
    return [(a, b) for a, b in (m.split(" ", 1) for m in merges)]


def _bos_eos_processor(bos: str | None, eos: str | None, add_bos: bool, add_eos: bool,
                       vocab: Mapping[str, int]) -> processors.TemplateProcessing:
    """BOS/EOS insertion, spelled exactly as transformers' `update_post_processor`."""
    b0 = b1 = e0 = e1 = ""
    special = []
    if add_bos and bos is not None:
        b0, b1 = f"{bos}:0 ", f" {bos}:1"
        special.append((bos, vocab[bos]))
    if add_eos and eos is not None:
        e0, e1 = f" {eos}:0", f" {eos}:1"
        special.append((eos, vocab[eos]))
    single = f"{b0}$A:0{e0}"
    pair = f"{single}{b1} $B:1{e1}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    """GGUF "gpt2": byte-level BPE, split by the regex of the `pre` flavour."""
    # Tokens are spelled in GPT-2's byte alphabet; the odd one that is not gets respelled.
    spell = _BYTE_SPELLING
    vocab = {t if _BYTE_ALPHABET.issuperset(t) else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    pairs = _merge_pairs(merges)
    bpe = models.BPE(vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="",
                     fuse_unk=False)
    backend = tokenizers.Tokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:  # GPT-2's own regex, inside ByteLevel
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tokens: list[str], merges: list[str] | None, scores: list[float],
                           arch: str) -> tokenizers.Tokenizer:
    """GGUF "llama": SentencePiece BPE with byte fallback; merges rebuilt from scores if absent."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = _merge_pairs(merges)
    else:
        pairs = _generate_merges(tokens, scores)
    bpe = models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    if arch == "phi3":  # Phi-3 prepends "▁" in a normalizer: "  x" keeps both spaces
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                   normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return backend


def _gguf_fields(reader: Any) -> dict[str, Any]:
    """The tokenizer keys of an open `gguf.GGUFReader`, as Python values (49k strings: ~15 ms)."""
    keys = [k for k in reader.fields if k.startswith("tokenizer.") or k == "general.architecture"]
    return {k: reader.fields[k].contents() for k in keys}


def _special(tokens: Iterable[str], special: bool = True) -> list[AddedToken]:
    return [AddedToken(t, normalized=False, special=special) for t in tokens]


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and default stop tokens.

    Immutable after construction (a memo of one-token decodes aside); safe to share between
    requests and threads (the Rust tokenizer is thread-safe for encode/decode)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_stop_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_token_id = self._id(bos_token)
        self.eos_token_id = self._id(eos_token)
        self.pad_token_id = self._id(pad_token)
        # Dropped from the text by decode(skip_special_tokens=True).
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        )
        # Byte-fallback tokens "<0xE4>": the decoder turns each run of them into text as a whole.
        byte_ids = (self._id(f"<0x{b:02X}>") for b in range(256))
        decoder = backend.decoder
        has_fallback = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()
        self.byte_token_ids: frozenset[int] = frozenset(
            i for i in byte_ids if i is not None and has_fallback
        )
        stops = {self.eos_token_id, *extra_stop_token_ids, *map(self._id, END_OF_GENERATION_TOKENS)}
        if self._id("<|return|>") is not None and self._id("<|call|>") is not None:
            stops.discard(self._id("<|end|>"))  # harmony: <|end|> ends a message, not the reply
        self.stop_token_ids: frozenset[int] = frozenset(i for i in stops if i is not None)
        # decode([id]) by (id, skip_special_tokens): the detokenizer's window before each new
        # token is usually that one token, once per request and step
        self._one: dict[tuple[int, bool], str] = {}
        self._pieces: dict[bool, tuple[bytes, ...] | None] = {}  # byte_pieces(), built on first use

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: str | Path | Any) -> Tokenizer:
        """From a GGUF file path or an already open `gguf.GGUFReader`."""
        if isinstance(source, (str, Path)):
            from tokenmill.loader.gguf_loader import open_gguf

            source = open_gguf(Path(source))
        return cls.from_gguf_metadata(_gguf_fields(source))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """From GGUF metadata as plain values: {"tokenizer.ggml.tokens": [...], ...}."""
        kind = meta.get("tokenizer.ggml.model")
        arch = meta.get("general.architecture", "")
        if kind not in SUPPORTED_GGUF_TOKENIZERS or (kind == "llama" and arch.startswith("gemma")):
            raise ValueError(
                f"unsupported GGUF tokenizer: tokenizer.ggml.model={kind!r} "
                f"(architecture {arch!r}); supported: 'gpt2' (byte-level BPE) and "
                "'llama' (SentencePiece BPE, not Gemma)"
            )
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or ()
        merges = meta.get("tokenizer.ggml.merges")
        if kind == "gpt2":
            backend = _byte_level_backend(tokens, merges or [], meta.get("tokenizer.ggml.pre", ""))
            assumed = ["<|endoftext|>"]  # the special token transformers' GPT2Tokenizer assumes
        else:
            scores = meta.get("tokenizer.ggml.scores") or []
            backend = _sentencepiece_backend(tokens, merges, scores, arch)
            assumed = ["<unk>", "<s>", "</s>"]  # and those LlamaTokenizer assumes
        vocab = backend.get_vocab(with_added_tokens=False)

        # CONTROL tokens are special; one spelled outside the byte alphabet is a converter
        # mislabel and is skipped. USER_DEFINED tokens are matched whole but are not special.
        backend.add_special_tokens(_special(
            t for t, ty in zip(tokens, types)
            if ty == _TOKEN_CONTROL and (kind != "gpt2" or _BYTE_ALPHABET.issuperset(t))
        ))
        backend.add_tokens(_special(
            (t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab), False
        ))

        def named(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = named("bos_token_id"), named("eos_token_id")
        unk, pad = named("unknown_token_id"), named("padding_token_id")
        named_tokens = (*assumed, bos, eos, unk, pad)
        backend.add_special_tokens(_special(t for t in named_tokens if t in vocab))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _bos_eos_processor(bos, eos, add_bos, add_eos, vocab)
        eot_eom = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eot", "eom")
                   if f"tokenizer.ggml.{k}_token_id" in meta]
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                   chat_template=meta.get("tokenizer.chat_template"), extra_stop_token_ids=eot_eom)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face model directory: tokenizer.json (used as is: its post-processor
        decides BOS/EOS, and tokenizer_config's add_bos_token is ignored, as transformers 5 does
        when tokenizer.json exists), tokenizer_config.json (special tokens, chat template),
        generation_config.json (more eos ids, which become stop tokens)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (the tokenizer file we read)")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)

        def named(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        bos, eos, unk, pad = (named(f"{k}_token") for k in ("bos", "eos", "unk", "pad"))
        vocab = backend.get_vocab(with_added_tokens=True)
        backend.add_special_tokens(_special(t for t in (bos, eos, unk, pad) if t in vocab))
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or ())
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                   chat_template=_hf_chat_template(path, config), extra_stop_token_ids=extra,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces")))

    # -- text <-> ids -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are 0..vocab_size-1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS added only if the model asks for them and
        `add_special_tokens` is set. Special-token text such as "<|im_start|>" maps to its id."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters decode to U+FFFD."""
        if len(ids) == 1:
            key = (ids[0], skip_special_tokens)
            text = self._one.get(key)
            if text is None:
                text = self._one[key] = self._decode(ids, skip_special_tokens)
            return text
        return self._decode(ids, skip_special_tokens)

    def byte_pieces(self, skip_special_tokens: bool = True) -> tuple[bytes, ...] | None:
        """Every token's bytes, indexed by id (skipped special tokens: b""), where decode(ids) is
        exactly the lossy UTF-8 decoding of their concatenation; None where it is not. That holds
        for byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen: a ByteLevel decoder alone) whose added
        tokens are ASCII, without the transformers clean-up; SentencePiece decoders (a leading
        space stripped, byte-fallback runs) are not of that kind. A streaming detokenizer then
        needs no decode call per token (engine/detokenizer.py). Built on first use (~0.1 s for a
        49k vocabulary)."""
        if False not in self._pieces:
            self._pieces[False] = self._byte_pieces()
        if skip_special_tokens and True not in self._pieces:  # the same pieces, special tokens blank
            pieces = self._pieces[False]
            if pieces is not None:
                pieces = list(pieces)
                for i in self.special_token_ids:
                    pieces[i] = b""
                pieces = tuple(pieces)
            self._pieces[True] = pieces
        return self._pieces[skip_special_tokens]

    def _byte_pieces(self) -> tuple[bytes, ...] | None:
        """byte_pieces with special tokens kept as their text."""
        decoder = self.backend.decoder
        if self.clean_up_tokenization_spaces or decoder is None:
            return None
        if json.loads(decoder.__getstate__()).get("type") != "ByteLevel":
            return None
        added = self.backend.get_added_tokens_decoder()
        if not all(t.content.isascii() for t in added.values()):
            return None
        byte_of = {c: bytes([b]) for b, c in _BYTE_SPELLING.items()}
        pieces = []
        for i in range(self.backend.get_vocab_size(with_added_tokens=True)):
            token = added.get(i)
            if token is not None:  # added tokens are text, not byte spellings
                pieces.append(token.content.encode())
                continue
            spelling = self.backend.id_to_token(i)
            # a character outside the byte alphabet stands for itself, as the decoder reads it
            pieces.append(b"".join(byte_of.get(c) or c.encode() for c in spelling) if spelling else b"")
        return tuple(pieces)

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary spellings (byte-level "Ġhi", SentencePiece "▁hi"); None if unknown."""
        return [self.backend.id_to_token(i) for i in ids]

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt string for `messages` ([{"role": ..., "content": ...}]), rendered as
        transformers' `apply_chat_template(tokenize=False)` does; `kwargs` are extra template
        variables (`tools=[...]`, template options). Encode the result with
        `add_special_tokens=False`: the template writes the special tokens itself."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; give a plain prompt, not messages")
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                  "unk_token": self.unk_token, "pad_token": self.pad_token}
        variables = {k: v for k, v in tokens.items() if v is not None} | kwargs
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat: encode(apply_chat_template(...), add_special_tokens=False)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config's (its "default")."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    template = _read_json(path / "chat_template.json").get("chat_template", template)
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def load_tokenizer(model_path: str | Path) -> Tokenizer:
    """The tokenizer of a model given as a GGUF file or a Hugging Face model directory."""
    path = Path(model_path)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return Tokenizer.from_gguf(path)
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic); give a .gguf or a model dir")
    raise FileNotFoundError(f"no such model file or directory: {path}")
