"""Page tables for one `generate` batch over the paged KV cache (attention_impl="pallas").

The n rows of a prompt share its pages vLLM style: the prefill writes each prompt's pages
once; pages the prompt fills are held by all its rows (refcounted by a `PageAllocator`), and the
prompt's partial last page, which decode writes into, is copied per row (copy-on-write);
decode pages are private, so no row ever writes a shared page.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jinfer.buckets import bucket
from jinfer.cache.page_allocator import PageAllocator, page_table_array, pages_for


@dataclasses.dataclass
class PagePlan:
  """Where a batch's paged cache keeps what; see `plan_shared_pages`.

  Prompt p's prefill writes the pages of prompt_tables_PxM[p] (NO_PAGE for padding prompts),
  then page copy_src_C[i] is copied to copy_dst_C[i] (C = B: at most one copy per row, padded
  with a page copied onto itself) and each row decodes through its table tables_BxM[b].
  """

  num_pages: int  # the pool
  prompt_tables_PxM: np.ndarray
  tables_BxM: np.ndarray
  copy_src_C: np.ndarray
  copy_dst_C: np.ndarray


def plan_shared_pages(prompt_lens: Sequence[int], row_prompts: Sequence[int],
                      row_max_tokens: Sequence[int], *, num_prompts: int, batch: int,
                      prompt_len: int, capacity: int, page_size: int) -> PagePlan:
  """Page tables in which the rows of a prompt share its full pages.

  `prompt_lens[p]` are the real prompts' lengths, `row_prompts[r]` / `row_max_tokens[r]` each
  real row's prompt and token budget; the arrays are padded to `num_prompts` prompts and
  `batch` rows of `prompt_len + capacity` tokens. Each prompt gets the pages its tokens fill,
  written once by its prefill. Its rows fork that table (refcounts) and reserve what they will
  write: a partial last prompt page is copied (copy-on-write) for every row of the prompt but
  the last, which keeps the original, and decode pages are fresh. Full prompt pages are never
  written again, so they stay shared; padding rows get no pages (their writes are dropped).
  The pool is the pages used, rounded up to a power of two so that few programs compile.
  """
  max_pages = pages_for(prompt_len + capacity, page_size)
  allocator = PageAllocator(batch * max_pages)  # enough: every page ends up in some row's table
  prompt_tables = [allocator.allocate(pages_for(n, page_size)) for n in prompt_lens]
  forks = [allocator.fork(prompt_tables[p]) for p in row_prompts]
  for table in prompt_tables:
    allocator.free(table)  # the rows hold every prompt page now
  tables, copies = [], []
  for p, max_tokens, table in zip(row_prompts, row_max_tokens, forks):
    table, copy = allocator.reserve(table, prompt_lens[p], prompt_lens[p] + max_tokens, page_size)
    tables.append(table)
    copies += [copy] if copy else []
  # Prompt 0's first page is never a copy's destination: copying it onto itself changes nothing.
  no_op = prompt_tables[0][0]
  src_C, dst_C = np.asarray(copies + [(no_op, no_op)] * (batch - len(copies)), np.int32).T
  used = max(max(table) for table in tables) + 1
  padded = lambda held, count: page_table_array(held + [[]] * (count - len(held)), max_pages)
  return PagePlan(num_pages=min(bucket(used, minimum=1), batch * max_pages),
                  prompt_tables_PxM=padded(prompt_tables, num_prompts),
                  tables_BxM=padded(tables, batch), copy_src_C=src_C, copy_dst_C=dst_C)
