"""Incremental detokenizer with stop strings.

Decoding token by token is wrong for byte-level BPE and sentencepiece: a multi-byte character can
span tokens, and a token's text can depend on its left neighbour (leading spaces).  So each step
decodes a short window of tokens twice (prefix_offset:read_offset and prefix_offset:end) and emits
the difference, holding it back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any, Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        self.token_ids: list[int] = []
        # Start from the last few prompt tokens so the first output token gets its context
        # (e.g. no spurious leading space removal in sentencepiece).
        tail = list(prompt_token_ids[-5:])
        self._ids: list[int] = tail
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.output_text = ""
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str | None:
        """Append one token; return the stop string if the text now contains one."""
        self.token_ids.append(token_id)
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self.prefix_offset:self.read_offset])
        full = self._decode(self._ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix):]
            start = len(self.output_text)
            self.output_text += new_text
            self.prefix_offset = self.read_offset
            self.read_offset = len(self._ids)
            return self._check_stop(start)
        return None

    def _check_stop(self, new_start: int) -> str | None:
        for s in self.stop:
            # a stop string may begin inside earlier text and end in the new text
            idx = self.output_text.find(s, max(0, new_start - len(s) + 1))
            if idx != -1:
                end = idx + len(s) if self.include_stop else idx
                self.output_text = self.output_text[:end]
                return s
        return None

    def visible_text(self, finished: bool) -> str:
        """The text so far; while running, without the tail that could still grow into a stop
        string, so every visible text is a prefix of the final one (streaming relies on it)."""
        if finished or not self.stop:
            return self.output_text
        return self.output_text[:max(0, len(self.output_text) - self._holdback)]
