"""Turns a `generate` request (prompts and their SamplingParams) into the padded arrays of one
batch: checked token ids, one row per sample, per-row sampling arrays and, for the paged cache,
the page plan.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from jinfer import distributed, sharding, validation
from jinfer.buckets import bucket
from jinfer.cache.page_allocator import pages_for
from jinfer.cache.page_plan import PagePlan, plan_shared_pages
from jinfer.decoding.sampling import SamplingArrays, SamplingParams
from jinfer.validation import Prompt, check_request


@dataclasses.dataclass
class SequenceRow:
  """One generated sequence: sample `index` of prompt `prompt`."""

  prompt: int
  index: int
  params: SamplingParams
  stop_ids: list[int]


@dataclasses.dataclass
class PreparedBatch:
  """A request as padded arrays: P prompts (bucketed) of T tokens, B rows (bucketed)."""

  prompt_ids: list[list[int]]
  rows: list[SequenceRow]  # real rows; the batch is padded past them with rows that start done
  tokens_PxT: np.ndarray
  prompt_lens_P: np.ndarray
  row_prompt_B: np.ndarray
  sampling: SamplingArrays
  done_B: np.ndarray
  capacity: int
  num_top_logprobs: int
  pages: Optional[PagePlan] = None  # attention_impl="pallas" only


def encode_prompts(model, prompts: Sequence[Prompt]) -> list[list[int]]:
  """Token ids of each prompt, checked (see `validation.prompts`)."""
  checked = validation.prompts(prompts, model.config.vocab_size)
  ids = [model.tokenizer.encode(p) if isinstance(p, str) else p for p in checked]
  for i, prompt_ids in enumerate(ids):
    check_request(bool(prompt_ids), f"prompt {i} encodes to no tokens; give some text.")
  return ids


def per_prompt_params(params, count: int) -> list[SamplingParams]:
  """One SamplingParams per prompt: `params` repeated (None: the defaults) or checked as given."""
  if params is None:
    return [SamplingParams()] * count
  if isinstance(params, SamplingParams):
    return [params] * count
  check_request(isinstance(params, Sequence) and all(isinstance(p, SamplingParams) for p in params),
                "params must be a SamplingParams or a list of them (one per prompt), got "
                f"{type(params).__name__}; build one with jinfer.SamplingParams(**fields).")
  check_request(len(params) == count, f"got {len(params)} SamplingParams for {count} prompts; "
                "pass one for all prompts or exactly one per prompt.")
  return list(params)


def stop_ids(model, p: SamplingParams) -> list[int]:
  """The token ids that end a sequence of `p`: its stop_token_ids and, unless ignore_eos, EOS."""
  eos = [] if p.ignore_eos else sorted(model.tokenizer.eos_ids)
  return list(p.stop_token_ids) + eos


def bad_word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
  """Each bad word's token ids as vLLM forms them: the word alone and after a space."""
  variants = {tuple(tokenizer.encode(text, add_bos=False)) for word in words
              for text in (word, " " + word.lstrip())}
  return [list(ids) for ids in sorted(variants) if ids]


def prepare_batch(model, prompts, params) -> PreparedBatch:
  """Checks the request and lays it out (prompt order; a prompt's n samples next to each other)."""
  validation.model(model)
  prompt_ids = encode_prompts(model, prompts)
  params = per_prompt_params(params, len(prompt_ids))
  for i, (ids, p) in enumerate(zip(prompt_ids, params)):
    p.check_vocab(model.config.vocab_size)
    validation.fits_context(i, len(ids), p.max_tokens, model.config.max_seq_len)
  rows = [SequenceRow(i, j, p, stop_ids(model, p)) for i, p in enumerate(params) for j in range(p.n)]
  # Every data shard gets whole rows.
  num_prompts = sharding.round_up_rows(bucket(len(prompt_ids), minimum=1), model.mesh)
  batch = sharding.round_up_rows(bucket(len(rows), minimum=1), model.mesh)
  tokens_PxT = np.zeros((num_prompts, prompt_bucket(model, max(map(len, prompt_ids)))), np.int32)
  prompt_lens_P = np.ones((num_prompts,), np.int32)
  for i, ids in enumerate(prompt_ids):
    tokens_PxT[i, :len(ids)] = ids
    prompt_lens_P[i] = len(ids)
  padding = SequenceRow(0, 0, SamplingParams(max_tokens=1, temperature=0.0), [])
  padded = rows + [padding] * (batch - len(rows))
  # Rows without a seed take consecutive seeds from one random base (drawn once per batch: in a
  # multi-process run drawing it is a broadcast).
  base = distributed.random_seed() if any(r.params.seed is None for r in rows) else 0
  seeds = [r.params.seed if r.params.seed is not None else base + i
           for i, r in enumerate(padded)]
  sampling = SamplingArrays.from_params(
      [r.params for r in padded], seeds, [r.stop_ids for r in padded], model.config.vocab_size,
      sample_index=[r.index for r in padded],
      bad_word_ids=[bad_word_ids(model.tokenizer, r.params.bad_words) for r in padded])
  b = PreparedBatch(prompt_ids, rows, tokens_PxT, prompt_lens_P,
             np.asarray([r.prompt for r in padded], np.int32), sampling,
             np.arange(batch) >= len(rows), bucket(max(p.max_tokens for p in params)),
             max(p.logprobs or 0 for p in params))
  if model.attention_impl == "pallas":
    # The paged pool is one for all rows, not split over data shards: a row would read pages
    # its prompt wrote on another shard.
    check_request(sharding.data_size(model.mesh) == 1,
                  "attention_impl='pallas' (the paged cache) runs on a mesh with a data axis of "
                  "1 only; shard with mesh={'data': 1, 'model': -1}, or use attention_impl='xla'.")
    b.pages = plan_shared_pages(
        [len(ids) for ids in prompt_ids], [r.prompt for r in rows],
        [r.params.max_tokens for r in rows], num_prompts=num_prompts, batch=batch,
        prompt_len=tokens_PxT.shape[1], capacity=b.capacity, page_size=model.page_size)
  return b


LONG_PROMPT = 512  # beyond this, prompts pad to a multiple of LONG_PROMPT_STEP
LONG_PROMPT_STEP = 256


def prompt_bucket(model, longest: int) -> int:
  """Padded prompt length: a power of two up to LONG_PROMPT tokens, then a multiple of
  LONG_PROMPT_STEP (a 5,000-token prompt pads to 5,120, not 8,192); for the paged cache a whole
  number of pages."""
  if longest <= LONG_PROMPT:
    length = bucket(longest)
  else:
    length = -(-longest // LONG_PROMPT_STEP) * LONG_PROMPT_STEP
  if model.attention_impl == "pallas":
    length = pages_for(length, model.page_size) * model.page_size
  return length
