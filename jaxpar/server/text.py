"""A completion's text as it grows, for streaming: never a split multi-byte character, never a piece of a stop
string that may still complete."""
from __future__ import annotations


class TextStream:
    """push(tokens) -> the text that may be sent now; finish(request) -> the rest.

    Decoding the whole output each time keeps tokenizers that merge across tokens (spaces, byte fallback)
    right; a trailing U+FFFD is an incomplete UTF-8 sequence and waits for its next bytes. With stop strings,
    the last (longest stop - 1) characters wait too (they may begin one), and nothing from the start of a
    complete one is sent (the tokens that complete it arrive with it; the scheduler has ended the request)."""

    def __init__(self, decode, stop: tuple = ()):
        self.decode = decode
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def push(self, tokens: list[int]) -> str:
        self.ids += tokens
        text = self.decode(self.ids).rstrip("\ufffd")
        end = len(text) - self.hold
        for s in self.stop:  # the tokens that complete a stop string come with it: never past its start
            i = text.find(s)
            if i >= 0:
                end = min(end, i)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece

    def finish(self, request) -> str:
        """The rest of the text once the request has ended (cut before the stop string if one ended it)."""
        text = request.text if request.text is not None else self.decode(request.output)
        piece, self.sent = text[self.sent:], len(text)
        return piece
