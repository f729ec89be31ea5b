"""Decoding strategies compared on the same prompts: greedy, sampling, beam search and
speculative decoding (n-gram and self drafts). Speed, and the outputs themselves: speculative
greedy decoding must say exactly what greedy says."""

from __future__ import annotations

from collections.abc import Callable

import jinfer
from experiments import common
from jinfer.benchmark import speculative_config

STRATEGIES = ("greedy", "sampling", "beam", "speculative-ngram", "speculative-self")


def num_points(config) -> int:
  """Checks the config's fields and counts the points the run measures."""
  unknown = sorted(set(config.strategies) - set(STRATEGIES))
  if unknown:
    raise ValueError(f"config.strategies: unknown {unknown}; choose from {STRATEGIES}.")
  return len(config.strategies)


def _strategy(name: str, model, config) -> Callable[[], list[tuple[str, int]]]:
  """A function running `name` on the config's prompts -> [(text, generated tokens)]."""
  prompts = list(config.prompts)
  greedy = jinfer.SamplingParams(temperature=0.0, max_tokens=config.max_tokens, ignore_eos=True)
  if name == "beam":
    params = jinfer.BeamSearchParams(beam_width=config.beam_width, max_tokens=config.max_tokens,
                                     ignore_eos=True)
    return lambda: [(beams[0].text, len(beams[0].token_ids))
                    for beams in jinfer.beam_search(model, prompts, params)]
  speculative = None
  if name.startswith("speculative-"):
    speculative = speculative_config(name.split("-", 1)[1], model, config.num_draft_tokens)
  if name == "sampling":
    greedy = jinfer.SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                   seed=config.seed, max_tokens=config.max_tokens,
                                   ignore_eos=True)
  return lambda: [(c.text, len(c.token_ids))
                  for c in jinfer.generate(model, prompts, greedy, speculative=speculative)]


def run(config, model, progress) -> tuple[common.Results, common.Figures]:
  """Measures every point (calling progress(1) after each); returns (results, figures)."""
  rows = []
  for name in config.strategies:
    outputs, seconds = common.seconds(_strategy(name, model, config), config.repeats)
    tokens = sum(n for _, n in outputs)
    rows.append({"strategy": name, "seconds": seconds, "tokens": tokens,
                 "tok_s": tokens / seconds, "texts": [text for text, _ in outputs]})
    progress(1)
  greedy_texts = next((r["texts"] for r in rows if r["strategy"] == "greedy"), None)
  for row in rows:  # speculative greedy is exact: the same text as plain greedy
    if greedy_texts is not None and row["strategy"].startswith("speculative-"):
      row["same_as_greedy"] = row["texts"] == greedy_texts
  fig, ax = common.figure(f"Decoding strategies ({config.model}, {len(config.prompts)} prompts)",
                          "strategy", "generated tokens / s")
  ax.bar([r["strategy"] for r in rows], [r["tok_s"] for r in rows], color="tab:blue")
  ax.tick_params(axis="x", labelrotation=20)
  return {"rows": rows}, {"decoding": fig}
