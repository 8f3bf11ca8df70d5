"""Watching a relayed event stream: forward whole events only, and know whether it reached [DONE].

A stream that stops without `data: [DONE]` is an incomplete answer, and an OpenAI client cannot tell
it from a complete one (the last chunk simply has no finish_reason). The router therefore appends an
error event and `[DONE]` itself when the replica's stream breaks; holding back a half-sent event
keeps that error event from being glued onto a fragment the client could not parse anyway.
"""

from __future__ import annotations

import json
import re

DONE_EVENT = b"data: [DONE]\n\n"
# The blank line that ends an event, in each line-ending style the SSE spec allows.
_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")
# A `data: [DONE]` *line*: JSON strings cannot hold a raw newline, so generated text that happens
# to read "data: [DONE]" is never mistaken for the end.
_DONE_LINE = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\][ \t]*(?:[\r\n]|$)")


def _end_of_last_event(data: bytes, start: int) -> int:
    """Index just past the last complete event in `data` (0 if none); `start` skips text searched before."""
    end = 0
    for sep in _EVENT_ENDS:
        at = data.rfind(sep, start)
        if at >= 0:
            end = max(end, at + len(sep))
    return end


class EventWatch:
    """Frames a byte stream into whole SSE events and notes whether `[DONE]` went by.

    With `sse=False` (a body the router cannot read as events) it is a plain pipe and a clean end
    counts as complete.
    """

    def __init__(self, sse: bool = True) -> None:
        self.sse = sse
        self.done = False
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events that `chunk` finishes (possibly none), in their original bytes."""
        if not self.sse:
            return chunk
        # Only the new bytes (and a separator straddling the seam) can hold a new event end.
        start = max(len(self._partial) - 3, 0)
        data = self._partial + chunk
        cut = _end_of_last_event(data, start)
        whole, self._partial = data[:cut], data[cut:]
        if whole and not self.done:
            self.done = _DONE_LINE.search(whole) is not None
        return whole

    def finish(self) -> bytes:
        """After a clean end of the upstream body: the unterminated tail if it completes the stream."""
        if not self.sse:
            self.done = True
            return b""
        tail, self._partial = self._partial, b""
        if not self.done and _DONE_LINE.search(tail):
            self.done = True
            return tail
        return tail if self.done else b""  # a fragment of an unfinished event is dropped

    @property
    def dropped(self) -> int:
        """Bytes of an unfinished event held back (what a failed stream never forwarded)."""
        return len(self._partial)


def upstream_failed_event(reason: str) -> bytes:
    """The events that end a stream whose replica failed after the 200 went out: the error in
    OpenAI's shape (its clients raise on it), then `[DONE]` as the server itself does."""
    body = {"error": {
        "message": f"502 Bad Gateway: the replica serving this stream failed mid-stream ({reason}); "
                   "the answer is incomplete",
        "type": "upstream_error", "param": None, "code": "upstream_failed_mid_stream",
    }}
    return f"data: {json.dumps(body)}\n\n".encode() + DONE_EVENT
