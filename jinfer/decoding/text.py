"""A sequence's text as its tokens arrive: stable increments, stop strings found and trimmed, and
the finish reason."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from jinfer.decoding.requests import SequenceRow
from jinfer.tokenizers import IncrementalDetokenizer


class SequenceText:
  """A row's text as its tokens arrive: stable increments, with stop strings found and cut."""

  def __init__(self, tokenizer, stops: Sequence[str]):
    self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    self._stops = stops
    self._hold = max(map(len, stops), default=1) - 1  # a stop string may still be completing
    self.text = ""
    self.num_tokens = 0
    self.stop: Optional[tuple[int, str]] = None  # (where the stop string starts, which one)
    self._emitted = 0

  def push(self, token_ids: Sequence[int]) -> None:
    """Appends the text of `token_ids`; tokens after a stop string are ignored."""
    for token in token_ids:
      if self.stop is not None:
        return
      self.num_tokens += 1
      self._extend(self._detokenizer.push(token))

  def _extend(self, piece: str) -> None:
    start = max(0, len(self.text) - self._hold)
    self.text += piece
    found = [(self.text.find(s, start), s) for s in self._stops if self.text.find(s, start) >= 0]
    if found:
      self.stop = min(found)

  def take(self, final: bool) -> str:
    """The text not returned yet that no later token can change (all of it when final)."""
    if final and self.stop is None:
      self._extend(self._detokenizer.flush())
    if self.stop is not None:
      end = self.stop[0]
    else:
      end = len(self.text) if final else len(self.text) - self._hold
    out = self.text[self._emitted:max(end, self._emitted)]
    self._emitted = max(end, self._emitted)
    return out


def finish_reason(row: SequenceRow, token_ids: list[int], text: SequenceText) -> tuple[str, Union[int, str, None]]:
  """(finish_reason, stop_reason) of a finished row."""
  if text.stop is not None:
    return "stop", text.stop[1]
  if token_ids and token_ids[-1] in row.stop_ids:
    return "stop", (token_ids[-1] if token_ids[-1] in row.params.stop_token_ids else None)
  return "length", None
