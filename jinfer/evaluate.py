"""Quality measures of a model: `perplexity` on a text.

  python -m jinfer.evaluate --quantize=int8 --kv_cache_dtype=int8

prints the perplexity of the model on the text kept in jinfer/data (Chapter I of Alice's
Adventures in Wonderland, about 2.7k SmolLM2 tokens) or on --text_file.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.cache.kv_cache import KVCache
from jinfer.decoding.generate import bucket
from jinfer.errors import InvalidRequestError
from jinfer.models import llama

DEFAULT_TEXT = Path(__file__).parent / "data" / "alice_chapter1.txt"


def default_text() -> str:
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
  if len(ids) < 2:
    raise InvalidRequestError(f"scoring needs at least 2 tokens; the text has {len(ids)}.")
  if len(ids) > model.config.max_seq_len:
    raise InvalidRequestError(
        f"the text has {len(ids)} tokens, more than the model's context of "
        f"{model.config.max_seq_len}; split it and average the chunks' log-likelihoods.")
  if chunk_size < 1:
    raise InvalidRequestError(f"chunk_size must be at least 1; got {chunk_size}.")
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
  if token_ids is not None:
    return [int(t) for t in token_ids]
  return model.tokenizer.encode(default_text() if text is None else text)


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


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  import jinfer  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  model = jinfer.load_model(f.model, dtype=f.dtype, quantize=f.quantize or None,
                            kv_cache_dtype=f.kv_cache_dtype)
  text = Path(f.text_file).read_text(encoding="utf-8") if f.text_file else None
  print(f"perplexity: {perplexity(model, text, chunk_size=f.chunk_size):.4f}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or path.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
  flags.DEFINE_enum("quantize", "", ["", "int8", "int4"], "Quantize the weights.")
  flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "KV cache format.")
  flags.DEFINE_string("text_file", None, "Text to measure (default: jinfer/data's text).")
  flags.DEFINE_integer("chunk_size", 512, "Tokens per forward pass through the cache.")
  app.run(main)
