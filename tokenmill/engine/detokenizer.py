"""Incremental detokenization: output token ids in, text deltas out, stop strings applied.

The text of a request is defined as `tokenizer.decode(output_ids)`, cut at the first stop string.
Decoding the whole output every step would cost O(n) per token; instead each step decodes a small
window of recent tokens (the prefix/read offset scheme of vLLM and TGI):

    output ids:   t0 t1 t2 t3 t4 t5 t6
                           ^        ^     ^
                  prefix_offset  read_offset  end
    delta = decode(ids[prefix:end]) - decode(ids[prefix:read])

The window starts one already-decoded token back so that decoders which treat the first token
specially (SentencePiece strips its leading space) see the same context twice and the difference
is exactly the new text. Two things are held back rather than emitted:

  * a decode ending in U+FFFD: a byte-level token can end inside a multi-byte UTF-8 character;
    the next token completes it (at `finish()` the replacement characters are emitted as is);
  * a run of SentencePiece byte-fallback tokens (<0xE4><0xB8><0xAD>): the decoder turns a run
    into text only if the whole run is valid UTF-8, else every byte into U+FFFD, so a later byte
    can change the run's text; the run is held until a non-byte token closes it;
  * a tail of the text that could be the start of a stop string ("Obs" while stop is
    "Observation:"); it is released once it cannot be, or at `finish()`.

Byte-level BPE tokenizers (GPT-2's scheme: Llama 3, SmolLM2, Qwen) need no decode call at all:
their text is the UTF-8 decoding of the tokens' bytes concatenated (`Tokenizer.byte_pieces`), so
each step feeds the new tokens' bytes to an incremental UTF-8 decoder, which holds back a
character's incomplete bytes by itself (1.3 against 4.5 us per token for the window decode).

After the first complete stop string, `text` ends just before it (or just after it, with
`include_stop_str_in_output`), `stop_reason` names it, and later tokens are ignored.
Invariant: `text` == decode(output_ids) truncated as above, once `finish()` has run.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol


class _Decoder(Protocol):
    special_token_ids: frozenset[int]  # dropped from the text when skipping special tokens
    byte_token_ids: frozenset[int]  # byte-fallback tokens, empty for byte-level BPE

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Streaming text of one request's output tokens. Mutated by `update`/`finish`; one per request.

    `prompt_token_ids` is accepted for interface compatibility only: the output text is
    decode(output_ids) by definition, so the prompt never changes it (no leading space is borrowed
    from the prompt's last token)."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | str | None = None,
        include_stop_str_in_output: bool = False,
        incremental: bool = True,
    ) -> None:
        """incremental=False (no stop strings only): `update` only collects the ids and
        `finish` decodes them once: for callers that read the text only at the end."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.stop = [s for s in stops if s]
        # the stops' proper prefixes by their last character, longest first: the only candidates
        # for a held-back tail that ends in that character
        prefixes: dict[str, set[str]] = {}
        for stop in self.stop:
            for k in range(1, len(stop)):
                prefixes.setdefault(stop[k - 1], set()).add(stop[:k])
        self._prefixes_by_end = {c: sorted(ps, key=len, reverse=True) for c, ps in prefixes.items()}
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_token_ids: list[int] = []
        self.text = ""  # emitted so far: the concatenation of every returned delta
        self.stop_reason: str | None = None
        self.finished = False
        # decode(output_ids[:read_offset]) (byte-level: less a character's incomplete bytes);
        # `text` is a prefix of it
        self._decoded = ""
        self._prefix_offset = 0
        self._read_offset = 0
        self._skipped = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        byte_pieces = getattr(tokenizer, "byte_pieces", None)  # optional: the protocol's decode suffices
        self._pieces = byte_pieces(skip_special_tokens) if byte_pieces is not None else None
        if self._pieces is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        if not incremental and self.stop:
            raise ValueError("stop strings need incremental detokenization")
        self.incremental = incremental

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text that may now be shown (possibly "")."""
        if self.finished:
            return ""
        self.output_token_ids.extend(new_token_ids)
        if not self.incremental:
            return ""
        if self._pieces is not None and not self.stop:  # all of it can be shown: text == _decoded
            delta = self._decode_bytes(final=False)
            self.text = self._decoded = self.text + delta
            return delta
        self._decoded += self._decode_window(final=False)
        return self._emit(final=False)

    def finish(self) -> str:
        """End of generation without a stop string: return everything still held back."""
        if self.finished:
            return ""
        self._decoded += self._decode_window(final=True)
        delta = self._emit(final=True)
        self.finished = True
        return delta

    # -- internals ----------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        """Text of output_ids[read_offset:], or "" while it ends mid-character (unless final)."""
        if self._pieces is not None:
            return self._decode_bytes(final)
        ids, p, r = self.output_token_ids, self._prefix_offset, self._read_offset
        if r == len(ids) or (not final and self._in_byte_run()):
            return ""
        prefix_text = self._decode(ids[p:r])
        new_text = self._decode(ids[p:])
        if new_text.endswith("\ufffd") and not final:
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text) :]
        else:  # a decoder without the prefix property: fall back to one full decode
            delta = self._decode(ids)[len(self._decoded) :]
        # The next window starts at the old read offset, unless every new token is a skipped
        # special token: a window of only skipped tokens gives the decoder no first token to
        # strip, and it would strip the next real token's leading space instead.
        if any(t not in self._skipped for t in ids[r:]):
            self._prefix_offset = r
        self._read_offset = len(ids)
        return delta

    def _decode_bytes(self, final: bool) -> str:
        """The same, for byte-level tokenizers: the new tokens' bytes through the incremental
        decoder (a character's first bytes wait there for the rest; ids the tokenizer does not
        know add nothing, as in decode)."""
        ids, r, pieces = self.output_token_ids, self._read_offset, self._pieces
        n = len(pieces)
        self._read_offset = len(ids)
        if len(ids) == r + 1:
            t = ids[r]
            data = pieces[t] if 0 <= t < n else b""
        else:
            data = b"".join(pieces[t] if 0 <= t < n else b"" for t in ids[r:])
        return self._utf8.decode(data, final)

    def _in_byte_run(self) -> bool:
        """Whether the last token that reaches the decoder is a byte-fallback token."""
        byte_ids = self.tokenizer.byte_token_ids
        if not byte_ids:
            return False
        for t in reversed(self.output_token_ids):
            if t not in self._skipped:
                return t in byte_ids
        return False

    def _emit(self, final: bool) -> str:
        start, end = len(self.text), len(self._decoded)
        if self.stop:
            hit = self._find_stop(start)
            if hit is not None:
                pos, stop = hit
                end = pos + len(stop) if self.include_stop_str_in_output else pos
                self.stop_reason, self.finished = stop, True
            elif not final:
                end -= self._partial_stop_len(start)
        delta = self._decoded[start:end]
        self.text += delta
        return delta

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """The stop string that completes first in the unemitted text (ties: the longer one).
        A stop cannot begin before `start`: any text that could begin one was held back."""
        best: tuple[int, int, str] | None = None
        for stop in self.stop:
            pos = self._decoded.find(stop, start)
            if pos != -1 and (best is None or (pos + len(stop), pos) < best[:2]):
                best = (pos + len(stop), pos, stop)
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, start: int) -> int:
        """Length of the longest tail of the unemitted text that is a proper prefix of a stop."""
        decoded = self._decoded
        if len(decoded) <= start:
            return 0
        for prefix in self._prefixes_by_end.get(decoded[-1], ()):
            if decoded.endswith(prefix, start):  # within the unemitted text
                return len(prefix)
        return 0
