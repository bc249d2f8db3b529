"""An incremental Server-Sent Events parser (the WHATWG rules the bench needs)."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"


class SSEParser:
    """Feed bytes as they arrive; get back the events completed so far.

    Lines end in LF, CRLF or CR; a blank line ends an event; several `data:` lines join with
    LF; `:` lines are comments (keep-alives); one space after the colon is dropped. An event
    with no data is not dispatched.
    """

    def __init__(self) -> None:
        self._buf = ""
        # Keeps back a UTF-8 sequence split across chunks.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += self._decoder.decode(chunk)
        events: list[SSEEvent] = []
        while True:
            i = _line_end(self._buf)
            if i < 0:
                break
            line = self._buf[:i]
            # A CR at the very end may be the first half of CRLF: wait for the next byte.
            if self._buf[i] == "\r" and i + 1 == len(self._buf):
                break
            step = 2 if self._buf.startswith("\r\n", i) else 1
            self._buf = self._buf[i + step:]
            ev = self._line(line)
            if ev is not None:
                events.append(ev)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: a final event without its blank line is still dispatched (lenient;
        browsers drop it, but servers that forget the last blank line exist)."""
        rest = self._buf + self._decoder.decode(b"", final=True)
        self._buf = ""
        events = [ev for line in _LINES.split(rest) if (ev := self._line(line)) is not None]
        ev = self._line("")
        return [*events, ev] if ev is not None else events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent("\n".join(self._data), self._event or "message")
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


_LINES = re.compile(r"\r\n|\r|\n")


def _line_end(s: str) -> int:
    a, b = s.find("\n"), s.find("\r")
    if a < 0:
        return b
    return a if b < 0 else min(a, b)
