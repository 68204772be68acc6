"""Byte-level tokenizer of the embedded models: ids 0-255 are bytes, then BOS, EOS and PAD."""
from __future__ import annotations

BOS, EOS, PAD = 256, 257, 258


class ByteTokenizer:
    bos_id, eos_id, pad_id = BOS, EOS, PAD
    vocab_size = 259

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return (EOS,)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS] + ids if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
