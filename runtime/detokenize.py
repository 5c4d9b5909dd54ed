"""Stream text out of generated token ids, one token at a time, without breaking characters.

Each step decodes a short window of recent tokens and emits what the newest token added,
so byte-level BPE pieces of one UTF-8 character and SentencePiece's leading spaces come
out the same as one ``tokenizer.decode`` of the whole sequence.
"""

from __future__ import annotations

from typing import Sequence

import tokenizers

# Prompt tokens kept as context in front of the first generated token: enough for a
# decoder's word-boundary rules, and more than the 4 byte tokens one UTF-8 character needs.
_PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated ids into text pieces whose concatenation is the decoded text.

    Without ``prompt_ids`` the pieces join to ``tokenizer.decode(new_ids)`` exactly. With
    ``prompt_ids`` they join to the continuation of the prompt, ``decode(prompt + new)``
    minus ``decode(prompt)`` (what transformers' text-generation pipeline and vLLM return).
    The two agree for byte-level BPE; for SentencePiece-style tokenizers the continuation
    keeps the space in front of the first generated word, which a bare decode strips.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The ByteFallback decoder turns a whole run of <0xXX> tokens into U+FFFDs when the
        # run is not valid UTF-8, even the bytes that were valid on their own; so a run can
        # only be emitted once a token that is not a byte closes it.
        self._byte_fallback = "ByteFallback" in repr(tokenizer.decoder)
        prompt_ids = [int(i) for i in prompt_ids]
        start = max(0, len(prompt_ids) - _PROMPT_CONTEXT_TOKENS)
        # A window that starts inside a character would decode to U+FFFD at its front;
        # step back (at most a character's worth of byte tokens) to a character boundary.
        for _ in range(4):
            if start == 0 or not self._decode(prompt_ids[start:]).startswith(_REPLACEMENT_CHAR):
                break
            start -= 1
        self._ids: list[int] = prompt_ids[start:]
        # _ids[_prefix_offset:_read_offset] is text already accounted for, decoded as the
        # left context of the window; _ids[_read_offset:] is waiting to be emitted.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never half a character)."""
        self._ids.append(int(token_id))
        return self._emit(force=False)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD is a character whose remaining bytes are still to come. A window
        # no longer than its prefix means the new tokens added nothing yet (e.g. a skipped
        # special token); keeping the offsets keeps a real token at the window's front.
        if not force and (
            len(window_text) <= len(prefix_text)
            or window_text.endswith(_REPLACEMENT_CHAR)
            or (self._byte_fallback and self._is_byte_token(self._ids[-1]))
        ):
            return ""
        # The window and its prefix start at the same token, so decoders that treat the
        # first token specially (SentencePiece's leading-space strip) do so in both.
        piece = window_text[len(prefix_text) :]
        # Tokens left of the new prefix are never decoded again; dropping them keeps
        # memory flat over long generations.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return piece

    def _is_byte_token(self, token_id: int) -> bool:
        token = self._tokenizer.id_to_token(token_id)
        return token is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">")

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
