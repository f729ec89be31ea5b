"""The speculative-decoding sweep: draft method x drafts per step (k) against acceptance, tokens
per target forward and greedy decode speed, on a free continuation and (with a chat template) a
copying task, where prompt-lookup drafts have something to find."""

from __future__ import annotations

from experiments import common
from jinfer import SamplingParams
from jinfer.benchmark import COPY_INSTRUCTION, speculative_config
from jinfer.decoding.generate import generate_with_stats

WORKLOADS = ("continue", "copy")


def num_points(config) -> int:
  """Checks the config's fields and counts the points the run measures."""
  unknown = sorted(set(config.workloads) - set(WORKLOADS))
  if unknown:
    raise ValueError(f"config.workloads: unknown {unknown}; choose from {WORKLOADS}.")
  return len(config.workloads) * (1 + len(config.methods) * len(config.num_draft_tokens))


def _prompt(model, workload: str, num_tokens: int) -> list[int]:
  ids = common.prompt_ids(model, num_tokens)
  if workload == "continue":
    return ids
  if not hasattr(model.tokenizer, "apply_chat_template"):
    raise ValueError("config.workloads: 'copy' needs a tokenizer with a chat template; use "
                     "'continue' with this model.")
  message = COPY_INSTRUCTION + model.tokenizer.decode(ids)
  return model.tokenizer.encode(
      model.tokenizer.apply_chat_template([{"role": "user", "content": message}]))


def run(config, model, progress) -> tuple[common.Results, common.Figures]:
  """Measures every point (calling progress(1) after each); returns (results, figures)."""
  params = SamplingParams(temperature=0.0, max_tokens=config.max_tokens, ignore_eos=True)
  rows = []
  for workload in config.workloads:
    ids = _prompt(model, workload, config.prompt_tokens)
    points = [("none", 0)] + [(m, k) for m in config.methods for k in config.num_draft_tokens]
    plain_tok_s = None
    for method, k in points:
      spec = None if method == "none" else speculative_config(method, model, k)
      runs = [generate_with_stats(model, [ids], params, speculative=spec)
              for _ in range(config.repeats + 1)][1:]  # the first run compiles
      outputs, stats = min(runs, key=lambda run: run[1].decode_s)
      plain_tok_s = plain_tok_s or stats.decode_tokens_per_s
      rows.append({"workload": workload, "method": method, "k": k,
                   "decode_tok_s": stats.decode_tokens_per_s,
                   "speedup": stats.decode_tokens_per_s / plain_tok_s,
                   "acceptance": stats.acceptance_rate if spec else None,
                   "tokens_per_forward": stats.tokens_per_target_forward if spec else 1.0,
                   "token_ids": outputs[0].token_ids})
      progress(1)
  for row in rows:  # greedy speculative decoding is exact
    plain = next(r for r in rows if r["workload"] == row["workload"] and r["method"] == "none")
    row["same_as_plain"] = row["token_ids"] == plain["token_ids"]
  figures = {}
  for metric, label in (("speedup", "decode speed vs plain greedy"),
                        ("tokens_per_forward", "tokens per target forward")):
    fig, ax = common.figure(f"Speculative decoding ({config.model})", "drafts per step (k)",
                            label)
    for workload in config.workloads:
      for method in config.methods:
        line = [r for r in rows if r["workload"] == workload and r["method"] == method]
        ax.plot([r["k"] for r in line], [r[metric] for r in line], marker="o",
                label=f"{method}, {workload}")
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.legend()
    figures[metric] = fig
  return {"rows": rows}, figures
