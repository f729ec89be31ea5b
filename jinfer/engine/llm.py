"""`LLM`: the offline API (vLLM's): load a model once, then `generate` batches of prompts through
the continuous-batching `Engine`, with the same `Completion`s as `jinfer.generate`."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from jinfer import sharding, validation
from jinfer.decoding.requests import per_prompt_params
from jinfer.decoding.results import Completion
from jinfer.decoding.sampling import SamplingParams
from jinfer.engine.data_parallel import DataParallelEngine
from jinfer.engine.engine import Engine
from jinfer.validation import Prompt


class LLM:
  """A model and the engine that serves it.

      llm = jinfer.LLM("smollm2-135m-instruct", max_num_seqs=32)
      completions = llm.generate(prompts, jinfer.SamplingParams(max_tokens=64))

  `model_or_name` is a `Model` or anything `load_model` takes (with `dtype`, `quantize` and
  `kv_cache_dtype`); the other settings are `Engine`'s. `mesh` (a jax Mesh with axes
  ("data", "model"), or sizes such as {"model": -1}) shards the model and the KV pool over its
  model axis (tensor parallelism); a data axis above 1 serves with one engine per data row
  (`DataParallelEngine`, `max_num_seqs` slots each).
  """

  def __init__(self, model_or_name="smollm2-135m-instruct", *, dtype="float32",
               quantize: Optional[str] = None, kv_cache_dtype: str = "auto",
               max_num_seqs: int = 64, page_size: int = 16, num_pages: Optional[int] = None,
               max_model_len: Optional[int] = None, mesh=None, **engine_kwargs):
    from jinfer.model import Model, load_model  # pylint: disable=g-import-not-at-top
    if isinstance(model_or_name, Model):
      self.model = model_or_name if mesh is None else model_or_name.shard(mesh)
    else:
      self.model = load_model(model_or_name, dtype=dtype, quantize=quantize,
                              kv_cache_dtype=kv_cache_dtype, page_size=page_size, mesh=mesh)
    # A data axis serves with one engine per data row (each tensor parallel over its row).
    engine_type = DataParallelEngine if sharding.data_size(self.model.mesh) > 1 else Engine
    self.engine = engine_type(self.model, max_num_seqs=max_num_seqs, page_size=page_size,
                              num_pages=num_pages, max_model_len=max_model_len, **engine_kwargs)

  def generate(self, prompts: Sequence[Prompt],
               params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
               use_tqdm: bool = False) -> list[Completion]:
    """Completes every prompt; returns one Completion per sequence, in prompt order with a
    prompt's n samples next to each other (as `jinfer.generate`)."""
    prompts = validation.prompts(prompts, self.model.config.vocab_size)
    params = per_prompt_params(params, len(prompts))
    validation.boolean("use_tqdm", use_tqdm)
    ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done: dict[tuple[str, int], dict] = {}
    parts: dict[tuple[str, int], dict] = {}
    progress = None
    if use_tqdm:
      import tqdm  # pylint: disable=g-import-not-at-top
      progress = tqdm.tqdm(total=sum(p.n for p in params), desc="generate")
    while self.engine.has_unfinished():
      for out in self.engine.step():
        key = (out.request_id, out.index)
        part = parts.setdefault(key, {"text": "", "token_ids": [], "logprobs": [], "top": []})
        part["text"] += out.text
        part["token_ids"] += out.token_ids
        part["logprobs"] += out.logprobs
        part["top"] += out.top_logprobs or []
        if out.finish_reason is not None:
          done[key] = {**part, "finish_reason": out.finish_reason,
                       "stop_reason": out.stop_reason, "prompt": out.prompt_token_ids}
          if progress is not None:
            progress.update(1)
    if progress is not None:
      progress.close()
    completions = []
    for rid, sp in zip(ids, params):
      for index in range(sp.n):
        d = done[(rid, index)]
        completions.append(Completion(
            text=d["text"], token_ids=d["token_ids"], logprobs=d["logprobs"],
            finish_reason=d["finish_reason"], prompt_token_ids=list(d["prompt"]),
            stop_reason=d["stop_reason"], top_logprobs=d["top"] if sp.logprobs is not None else None,
            index=index))
    return completions
