"""Streaming detokenization with stop strings.

`IncrementalDetokenizer.step(ids)` turns newly generated ids into newly *safe* text:

* UTF-8 safety: a token can end in the middle of a multi-byte character (byte-level BPE splits
  emoji and CJK into byte tokens). We decode a small window of ids -- from a "prefix" offset,
  where earlier text decoded cleanly, to the end -- and emit the part past the previous "read"
  offset only when the window does not end in U+FFFD (vLLM's prefix/read-offset method). Since
  decoders are prefix-consistent from a clean character boundary, the concatenation of deltas
  equals ``tokenizer.decode(all_ids)``; decoding from a window start also keeps SentencePiece's
  "strip the first space" rule consistent with a full decode.
* Special tokens: when skipping them, their ids are dropped *before* windowing, so they never
  break a window (they would make SentencePiece strip a space a full decode keeps).
* Stop strings: the emitted text is scanned for them, across token boundaries. Any tail that
  could be the start of a stop string is held back until it is clear it is not. When one
  appears, ``stopped`` turns True, ``stop_reason`` names it, and nothing after it (nor the stop
  string itself, unless ``include_stop_str_in_output``) is ever emitted.

Per step the work is proportional to the new tokens (plus a window of a few tokens and the
longest stop string), not to the length of the output so far.
"""

from __future__ import annotations

from collections.abc import Iterable

from .tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens used as decoding context for the first output tokens.
_CONTEXT_TOKENS = 4
# A run of tokens that keeps ending mid-character is force-emitted after this many tokens, so
# that a degenerate stream cannot make every step re-decode an ever-growing window.
_MAX_PENDING_TOKENS = 64
# Drop consumed ids from the front of the window buffer past this many.
_TRIM_AT = 1024


class IncrementalDetokenizer:
    """Stateful detokenizer for one generated sequence.

    `prompt_token_ids`, when given, supplies the last few prompt tokens as decoding context, so
    that the first output token decodes as it does inside the full text (for SentencePiece
    models that keeps its leading space, like TGI's and vLLM's streams; for byte-level BPE it
    changes nothing). Without it, the stream equals ``tokenizer.decode(output_ids)`` exactly.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip: frozenset[int] = (
            tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        )
        self._stops: tuple[str, ...] = tuple(sorted({s for s in stop or () if s}))
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.include_stop_str_in_output = include_stop_str_in_output

        self._ids: list[int] = []
        if prompt_token_ids:
            context = [i for i in prompt_token_ids if i not in self._skip][-_CONTEXT_TOKENS:]
            # A context ending mid-character would shift the first delta; go without it then.
            if context and not self._decode(context).endswith(_REPLACEMENT):
                self._ids = context
        self._prefix = 0  # window start: a clean character boundary
        self._read = len(self._ids)  # text up to here has been handed on
        self._prefix_text = self._decode(self._ids)

        self._held = ""  # decoded text held back because it may start a stop string
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self.num_tokens = 0
        self.stopped = False
        self.stop_reason: str | None = None

    # ----------------------------------------------------------------- public

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returned deltas)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    def step(self, new_token_ids: Iterable[int]) -> str:
        """Add generated ids; return the text that became safe to show (maybe "")."""
        new = list(new_token_ids)
        self.num_tokens += len(new)
        if self.stopped:
            return ""
        self._ids.extend(i for i in new if i not in self._skip)
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """End of sequence: return everything still held back (an unfinished UTF-8 character
        decodes as U+FFFD), or "" if a stop string already fired."""
        if self.stopped:
            return ""
        return self._emit(self._decode_new(final=True), final=True)

    # ----------------------------------------------------------------- internals

    def _decode(self, ids: list[int]) -> str:
        # The skipped ids are already filtered out, so skip_special_tokens=False keeps exactly
        # the remaining ones (and equals a full decode with skipping).
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_new(self, *, final: bool) -> str:
        ids = self._ids
        if len(ids) == self._read:
            return ""
        new_text = self._decode(ids[self._prefix :])
        pending = len(ids) - self._read
        if not final and new_text.endswith(_REPLACEMENT) and pending < _MAX_PENDING_TOKENS:
            return ""  # the last token ends mid-character: wait for the rest
        delta = new_text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(ids)
        self._prefix_text = self._decode(ids[self._prefix : self._read])
        if self._prefix > _TRIM_AT:
            del ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta

    def _push(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            self._text_cache = None
        return text

    def _emit(self, delta: str, *, final: bool) -> str:
        if not self._stops:
            return self._push(delta)
        buf = self._held + delta
        best: tuple[int, int, str] | None = None  # (end, start, stop): earliest end wins
        for s in self._stops:
            start = buf.find(s)
            if start >= 0:
                candidate = (start + len(s), start, s)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is not None:
            _end, start, s = best
            self.stopped = True
            self.stop_reason = s
            self._held = ""
            return self._push(buf[: start + len(s)] if self.include_stop_str_in_output else buf[:start])
        if final:
            self._held = ""
            return self._push(buf)
        keep = len(buf)
        for k in range(max(0, len(buf) - self._max_stop + 1), len(buf)):
            tail = buf[k:]
            if any(s.startswith(tail) for s in self._stops):
                keep = k
                break
        self._held = buf[keep:]
        return self._push(buf[:keep])
