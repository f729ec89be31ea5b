"""What generation returns: finished sequences, streaming deltas and timing statistics."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass
class Completion:
  """One finished sequence.

  `finish_reason` is 'stop' (a stop token or stop string) or 'length'; `stop_reason` is the stop
  string or stop token id that ended it (None for EOS or length). `logprobs[i]` is the
  log-probability of `token_ids[i]`, and `top_logprobs[i]` the `SamplingParams.logprobs` most
  likely tokens at that step ({token id: log-probability}), both under the distribution that
  `logprobs_mode` names. `index` tells apart the n samples of one prompt.
  """

  text: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: str
  prompt_token_ids: list[int]
  stop_reason: Union[int, str, None] = None
  top_logprobs: Optional[list[dict[int, float]]] = None
  index: int = 0


@dataclasses.dataclass
class StreamDelta:
  """New output of sequence `index` (its position in `generate`'s result) since the last delta."""

  index: int
  text: str
  token_ids: list[int]
  finish_reason: Optional[str] = None  # set on the last delta of a sequence
  stop_reason: Union[int, str, None] = None


@dataclasses.dataclass
class GenerationStats:
  """Compile, prefill and decode seconds and token counts of generate calls."""

  compile_s: float = 0.0
  prefill_s: float = 0.0
  decode_s: float = 0.0
  prompt_tokens: int = 0
  generated_tokens: int = 0  # excludes each sequence's first token, which prefill produces
  # Speculative decoding only (zero otherwise): drafts proposed, drafts the target accepted, and
  # target forwards in the decode loop, summed over sequences.
  draft_tokens: int = 0
  accepted_tokens: int = 0
  target_forwards: int = 0

  @property
  def decode_tokens_per_s(self) -> float:
    """Generated tokens per decode second (nan before any decode time)."""
    return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")

  @property
  def acceptance_rate(self) -> float:
    """Fraction of speculative drafts accepted (nan without drafts)."""
    return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")

  @property
  def tokens_per_target_forward(self) -> float:
    """Generated tokens (past the first) per decode-loop target forward."""
    return (self.generated_tokens / self.target_forwards if self.target_forwards
            else float("nan"))
