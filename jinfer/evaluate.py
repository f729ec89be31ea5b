"""Quality measures of a model: `perplexity` on a text (command line: `jinfer evaluate`)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cache.kv_cache import KVCache
from jinfer.buckets import bucket
from jinfer import validation
from jinfer.errors import InvalidRequestError
from jinfer.validation import check_request
from jinfer.models import llama

DEFAULT_TEXT = Path(__file__).parent / "data" / "alice_chapter1.txt"


def default_text() -> str:
  """The default evaluation text (jinfer/data/alice_chapter1.txt)."""
  return DEFAULT_TEXT.read_text(encoding="utf-8")


def perplexity(model, text: Optional[str] = None, *, token_ids: Optional[Sequence[int]] = None,
               chunk_size: int = 512) -> float:
  """exp(mean negative log-likelihood) of each token of `text` given the tokens before it.

  The text (default: `default_text()`) is fed through the model's KV cache in chunks of
  `chunk_size` tokens, so the cache format the model decodes with (`model.kv_cache_dtype`, e.g.
  int8) is part of what is measured, and memory stays bounded by one chunk's logits.
  """
  nll, _ = score(model, _token_ids(model, text, token_ids), chunk_size)
  return math.exp(float(np.mean(nll)))


def greedy_agreement(model, reference, text: Optional[str] = None, *,
                     token_ids: Optional[Sequence[int]] = None, chunk_size: int = 512) -> float:
  """Fraction of the text's positions where `model` and `reference` predict the same next token
  (teacher-forced greedy agreement: each position sees the true text before it)."""
  ids = _token_ids(model, text, token_ids)
  _, predicted = score(model, ids, chunk_size)
  _, expected = score(reference, ids, chunk_size)
  return float(np.mean(predicted == expected))


def score(model, ids: Sequence[int], chunk_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """(NLL of each token after the first [T-1], the model's argmax prediction there [T-1])."""
  validation.model(model)
  ids = validation.token_ids("token_ids", ids, model.config.vocab_size)
  check_request(len(ids) >= 2, f"scoring needs at least 2 tokens; the text has {len(ids)}.")
  check_request(len(ids) <= model.config.max_seq_len,
                f"the text has {len(ids)} tokens, more than the model's context of "
                f"{model.config.max_seq_len}; split it and average the chunks' log-likelihoods.")
  chunk_size = validation.integer("chunk_size", chunk_size, low=1)
  chunk_size = min(chunk_size, bucket(len(ids) - 1, minimum=1))
  cache_len = -(-len(ids) // chunk_size) * chunk_size  # attention reads the whole cache: no slack
  # Distinct buffers per layer and for K and V, so each chunk can update the cache in place.
  cache = jax.tree.map(jnp.copy, KVCache.init(model.config, 1, cache_len, model.cache_dtype))
  inputs, targets = np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32)
  nll, predicted = [], []
  for start in range(0, len(inputs), chunk_size):
    valid = min(chunk_size, len(inputs) - start)
    nll_C, predicted_C, cache = _score_chunk(
        model.params, _padded(inputs[start:start + chunk_size], chunk_size),
        _padded(targets[start:start + chunk_size], chunk_size), jnp.int32(start), cache,
        config=model.config)
    nll.append(np.asarray(nll_C)[:valid])
    predicted.append(np.asarray(predicted_C)[:valid])
  return np.concatenate(nll), np.concatenate(predicted)


def _token_ids(model, text, token_ids) -> list[int]:
  validation.model(model)
  check_request(text is None or token_ids is None, "give text or token_ids, not both.")
  if token_ids is not None:
    return validation.token_ids("token_ids", token_ids, model.config.vocab_size)
  return model.tokenizer.encode(default_text() if text is None else validation.text("text", text))


def read_text_file(path) -> str:
  """The UTF-8 text of `path`, refused when missing, empty or binary (before any model loads)."""
  check_request(bool(str(path)), "the text file path is empty; pass the path of a UTF-8 text "
                "file, or leave it out to use the default text.")
  path = Path(path)
  check_request(path.is_file(), f"text file {str(path)!r} does not exist or is not a file; "
                "pass the path of a UTF-8 text file.")
  data = path.read_bytes()
  check_request(b"\0" not in data, f"text file {str(path)!r} is binary (it holds NUL bytes); "
                "pass a UTF-8 text file.")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InvalidRequestError(f"text file {str(path)!r} is not UTF-8 text (byte {e.start}: "
                              f"{e.reason}); convert it to UTF-8.") from None
  check_request(bool(text.strip()), f"text file {str(path)!r} is empty; give it some text.")
  return text


def _padded(x: np.ndarray, size: int) -> np.ndarray:
  return np.pad(x, (0, size - len(x)))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _score_chunk(params, tokens_C, targets_C, start, cache, *, config):
  """NLL of each target [C] and argmax prediction [C] of a chunk starting at `start`."""
  positions_C = start + jnp.arange(tokens_C.shape[0], dtype=jnp.int32)
  logits_1xCxV, cache = llama.forward(params, config, tokens_C[None], positions_C[None], cache)
  log_probs_CxV = jax.nn.log_softmax(logits_1xCxV[0].astype(jnp.float32), axis=-1)
  nll_C = -jnp.take_along_axis(log_probs_CxV, targets_C[:, None], axis=-1)[:, 0]
  return nll_C, jnp.argmax(log_probs_CxV, axis=-1), cache
