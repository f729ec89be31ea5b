"""Model parity: jinfer's logits equal transformers' (torch CPU, float32).

* The real SmolLM2-135M-Instruct GGUF: transformers dequantizes the same file, so both run the
  same float32 weights; logits, greedy text, KV-cache decode vs full-forward rollouts, bfloat16.
* Tiny random configs of every supported family (GQA/MHA/MQA, untied, Qwen2 biases, llama3 and
  linear RoPE scaling, Mistral) saved with `save_pretrained` and loaded by jinfer's HF loader.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import jinfer
from test_checkpoints import write_hf_tokenizer  # the tiny word-level tokenizer.json

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

# Observed on the dev machine (2 cores, jax 0.10.2 CPU vs torch 2.13 CPU): max |logit diff|
# 1.2e-4 (37-token chat prompt), 7.7e-5 (30 tokens), 7e-5 (17 tokens), 1.4e-4 (534 tokens),
# 1.5e-4 (1052 tokens); logits are O(10-30). The bound is 1e-2; we hold 2x the worst.
SMOLLM2_ATOL = 3e-4
FRANCE = "What is the capital of France?"
FRANCE_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"

LONG_TEXT = """\
The history of the river town begins with a handful of fishing families who settled on a low \
island where the current slowed. They built their huts from reeds and mud, traded smoked fish \
for grain with farmers upstream, and buried their dead under mounds that can still be seen today.

In the twelfth century a stone bridge replaced the old ferry. Tolls paid for a chapel, then a \
market hall, and the town's charter of 1187 granted its burghers the right to hold a fair every \
autumn. Wool merchants from Flanders came, and with them weavers, dyers and moneylenders.

Plague struck in 1349 and again in 1361. Almost half of the population died, fields went \
untended, and wages rose sharply. Yet the survivors rebuilt: the guild records show new \
apprentices, a grammar school, and a hospital run by an order of nursing sisters.

Modern chemistry explains why copper roofs turn green. Exposed to air and rain, copper \
oxidizes, then reacts with carbon dioxide and sulfur compounds to form a patina of basic copper \
carbonate and sulfate. The layer protects the metal beneath from further corrosion.

To bake a simple loaf, mix 500 grams of flour, 10 grams of salt, 7 grams of dried yeast and 350 \
millilitres of warm water. Knead for ten minutes, let it rise for an hour, shape it, let it rise \
again, and bake at 220 degrees Celsius for thirty-five minutes.

In mathematics, a prime number is a natural number greater than one that has no positive \
divisors other than one and itself. Euclid proved more than two thousand years ago that there \
are infinitely many primes, and his argument is still taught to students everywhere.

The committee met on Tuesday to discuss the budget. After a long debate about road repairs, \
library hours and the new swimming pool, the members voted seven to two to approve the plan, \
with an amendment requiring a public report every six months.

Migrating birds navigate by the sun, the stars and the Earth's magnetic field. Young swallows \
fly thousands of kilometres to Africa on their first autumn without ever having made the \
journey, guided by instinct and, some researchers think, by the smell of the coast.

"The train to the coast leaves at 7:42," she said, checking her watch. "If we miss it, the next \
one isn't until noon, and we'll lose the whole morning." He laughed, grabbed both bags, and ran.
"""


def chat(tokenizer, content: str, system: str | None = None) -> list[int]:
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": content}]
  return tokenizer.encode(tokenizer.apply_chat_template(messages))


def torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids, np.int64).reshape(1, -1))).logits[0].numpy()


def top2_gap(logits_TxV: np.ndarray) -> np.ndarray:
  top2 = np.sort(logits_TxV, axis=-1)[..., -2:]
  return top2[..., 1] - top2[..., 0]


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct.


@pytest.fixture(scope="module")
def smollm2_torch(smollm2_gguf_path):
  path = Path(smollm2_gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  return model.eval()


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, smollm2_torch):
  tok = smollm2.tokenizer
  prompts = [
      chat(tok, FRANCE),
      chat(tok, "Write a haiku about autumn leaves.", system="You are a poet. Answer briefly."),
      tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
  ]
  long_ids = tok.encode(LONG_TEXT)
  assert 512 < len(long_ids) < 700, len(long_ids)
  # The short prompts go through jinfer as one right-padded batch: causal attention means the
  # padding cannot change the logits of the real positions.
  width = max(map(len, prompts))
  batch = np.zeros((len(prompts), width), np.int32)
  for i, ids in enumerate(prompts):
    batch[i, :len(ids)] = ids
  ours_short = np.asarray(smollm2.logits(batch))
  ours_long = np.asarray(smollm2.logits(np.asarray([long_ids])))[0]
  cases = [(ids, ours_short[i, :len(ids)]) for i, ids in enumerate(prompts)]
  cases.append((long_ids, ours_long))
  for ids, ours in cases:
    ref = torch_logits(smollm2_torch, ids)
    assert ours.shape == ref.shape == (len(ids), 49152)
    diff = np.abs(ours - ref).max()
    assert diff <= SMOLLM2_ATOL, f"{len(ids)} tokens: max |diff| {diff}"
    # Greedy choices agree at every position, except where the reference itself is within
    # numerical noise of a tie (never seen: the smallest top-2 gap, on the long text, is 8.1e-4,
    # above 2 * SMOLLM2_ATOL, so today this demands agreement at every position).
    disagree = ours.argmax(-1) != ref.argmax(-1)
    assert np.all(top2_gap(ref)[disagree] < 2 * SMOLLM2_ATOL), np.flatnonzero(disagree)
    assert disagree.mean() < 0.01


@pytest.mark.slow
def test_smollm2_3000_token_prompt_logits_match_transformers(smollm2, smollm2_torch):
  # Well past the blockwise threshold (512 queries): 12 query blocks, key blocks skipped.
  ids = (smollm2.tokenizer.encode(LONG_TEXT) * 6)[:3000]
  assert len(ids) == 3000
  ours = np.asarray(smollm2.logits(np.asarray([ids])))[0]
  ref = torch_logits(smollm2_torch, ids)
  diff = np.abs(ours - ref).max()
  # Float32 sums drift with length: the dense pass measured 3.8e-4 here, blockwise 4.1e-4
  # (logits reach 46.8 in magnitude).
  assert diff <= 5e-4, f"max |diff| {diff}"
  assert np.mean(ours.argmax(-1) != ref.argmax(-1)) < 0.01


@pytest.mark.slow
def test_smollm2_greedy_reference_answer(smollm2):
  prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": FRANCE}])
  (out,) = jinfer.generate(smollm2, [prompt], jinfer.SamplingParams(max_tokens=32,
                                                                    temperature=0.0))
  assert len(out.prompt_token_ids) == 37
  assert out.token_ids == FRANCE_IDS
  assert out.text == "The capital of France is Paris."
  assert out.finish_reason == "stop"


def full_forward_rollout(model, prompts, steps):
  """Greedy rollout by full forward passes (no cache) over a fixed-width right-padded buffer.

  Returns, per prompt, the `steps` argmax tokens and the logits row each was chosen from.
  """
  width = max(map(len, prompts)) + max(steps)
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, ids in enumerate(prompts):
    tokens[i, :len(ids)] = ids
  chosen = [[] for _ in prompts]
  rows = [[] for _ in prompts]
  for step in range(max(steps)):
    logits = np.asarray(model.logits(tokens))  # one shape: compiled once
    for i, ids in enumerate(prompts):
      if step < steps[i]:
        pos = len(ids) + step
        row = logits[i, pos - 1]
        chosen[i].append(int(row.argmax()))
        rows[i].append(row)
        tokens[i, pos] = chosen[i][-1]
  return chosen, rows


@pytest.mark.slow
def test_smollm2_kv_cache_greedy_equals_full_forward_rollout(smollm2):
  tok = smollm2.tokenizer
  prompts = [tok.encode("The three primary colours are"),
             chat(tok, "Name a fruit that is yellow."),
             tok.encode("import numpy as np\n\nx = np.arange(10)\nprint(")]
  assert len({len(p) for p in prompts}) == 3  # ragged
  steps = [12, 16, 20]
  params = [jinfer.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in steps]
  outs = jinfer.generate(smollm2, prompts, params)
  expected, rows = full_forward_rollout(smollm2, prompts, steps)
  for out, want, logit_rows, n in zip(outs, expected, rows, steps):
    assert len(out.token_ids) == n and out.finish_reason == "length"
    # Exact equality is what we observe for these prompts (smallest top-2 gap along the rollouts
    # 8e-3, numerical noise 1e-5). A cache bug changes tokens outright; the only tolerated
    # difference is a flip between two logits within 1e-3 of each other (after which the rest
    # of the sequence legitimately diverges, so compare up to there).
    got = out.token_ids
    first_diff = next((t for t in range(n) if got[t] != want[t]), n)
    if first_diff < n:
      row = logit_rows[first_diff]
      assert row[want[first_diff]] - row[got[first_diff]] < 1e-3, (got, want)
    # The cached path's log-probabilities match the full forward pass's (observed: 2e-5).
    for t in range(first_diff):
      row = logit_rows[t].astype(np.float64)
      logprob = row[got[t]] - row.max() - np.log(np.exp(row - row.max()).sum())
      assert abs(out.logprobs[t] - logprob) < 2e-4, (t, out.logprobs[t], logprob)
  # At most one near-tie flip is believable; more means the tolerance is hiding a bug.
  assert sum(o.token_ids == e for o, e in zip(outs, expected)) >= 2


@pytest.mark.slow
def test_smollm2_bfloat16_close_to_float32(smollm2, smollm2_gguf_path):
  bf16 = jinfer.load_model(str(smollm2_gguf_path), dtype="bfloat16")
  assert str(bf16.dtype) == "bfloat16"
  assert str(bf16.params["layers"][0]["w_qkv"].dtype) == "bfloat16"
  tok = smollm2.tokenizer
  # Observed: chat prompt (37 tokens) max |diff| 0.96, mean 0.14, argmax agreement 100%;
  # 107-token text max 0.91, mean 0.09, argmax agreement 98.1% (2 positions). Bounds: ~2x.
  text_ids = tok.encode(LONG_TEXT.split("\n\n")[0] + "\n\n" + LONG_TEXT.split("\n\n")[3])
  for ids in (chat(tok, FRANCE), text_ids):
    ref = np.asarray(smollm2.logits(np.asarray([ids])))[0]
    ours = np.asarray(bf16.logits(np.asarray([ids])))[0]
    assert ours.dtype == np.float32
    diff = np.abs(ours - ref)
    assert diff.max() < 2.0 and diff.mean() < 0.3, (len(ids), diff.max(), diff.mean())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
  prompt = tok.apply_chat_template([{"role": "user", "content": FRANCE}])
  (out,) = jinfer.generate(bf16, [prompt], jinfer.SamplingParams(max_tokens=16, temperature=0.0))
  assert out.text.startswith("The capital of France is Paris"), out.text


# ---------------------------------------------------------------------------------------------
# Tiny random configs through the Hugging Face loader.

# float32: observed max |diff| 2e-6 to 8e-6 across the cases, with logits up to 8 (untied) or 32
# (tied) in magnitude.
TINY_ATOL = 5e-5
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
SEQ_LEN = 40
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

TINY_CASES = {
    "gqa": ("LlamaConfig", {}),
    "mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    "untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500.0)),
    "qwen2_bias": ("Qwen2Config", dict(use_sliding_window=False, rope_theta=1000.0)),
    "llama3_rope": ("LlamaConfig", dict(rope_scaling=LLAMA3, rope_theta=500.0)),
    "linear_rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0},
                                        rope_theta=500.0)),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False,
                                      head_dim=24)),
}


def tiny_torch_model(config_class: str, overrides: dict, seed: int = 0):
  """A random transformers model whose every weight (norms and biases too) is non-trivial."""
  torch.manual_seed(seed)
  config = getattr(transformers, config_class)(**{**TINY, **overrides})
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif "embed" in name:
        p.normal_(0, 0.4)
      elif "lm_head" in name:
        p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
      else:
        p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.3)
  return model.eval()


def save_tiny(model, directory: Path) -> Path:
  model.save_pretrained(directory)
  write_hf_tokenizer(directory)
  return directory


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_hf_model_logits_match_transformers(case, tmp_path):
  config_class, overrides = TINY_CASES[case]
  ref_model = tiny_torch_model(config_class, overrides)
  model = jinfer.load_model(str(save_tiny(ref_model, tmp_path)))
  ids = np.random.default_rng(1).integers(0, 256, (2, SEQ_LEN))
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(model.logits(ids))
  assert ours.shape == ref.shape == (2, SEQ_LEN, 256)
  assert np.abs(ref).max() > 1.0  # the random weights give logits well away from zero
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TINY_ATOL)
  # Each case really exercises its feature: switching it off changes the logits.
  cfg = model.config
  assert cfg.architecture == config_class.removesuffix("Config").lower()
  feature_off = {
      "untied": dataclasses.replace(cfg, tie_embeddings=True),
      "llama3_rope": dataclasses.replace(cfg, rope_scaling=None),
      "linear_rope": dataclasses.replace(cfg, rope_scaling=None),
  }.get(case)
  if feature_off is not None:
    plain = jinfer.Model(feature_off, model.params, model.tokenizer)
    assert np.abs(np.asarray(plain.logits(ids)) - ref).max() > 100 * TINY_ATOL
  expected_kv = {"mha": 4, "mqa": 1}.get(case, 2)
  assert cfg.n_kv_heads == expected_kv
  assert cfg.tie_embeddings == (case not in ("untied", "mistral"))
  assert cfg.qkv_bias == (case == "qwen2_bias")
  if case == "qwen2_bias":
    assert np.abs(ref_model.model.layers[0].self_attn.q_proj.bias.detach().numpy()).max() > 0.1
  if case == "mistral":
    assert cfg.head_dim == 24  # head_dim * n_heads != d_model


def test_tiny_hf_model_greedy_generate_matches_transformers(tmp_path):
  # Untied: with tied random embeddings the argmax is always the input token itself.
  ref_model = tiny_torch_model("LlamaConfig", dict(tie_word_embeddings=False), seed=3)
  model = jinfer.load_model(str(save_tiny(ref_model, tmp_path)))
  prompts = [[5, 17, 200, 3, 99, 41, 7], [250, 1, 2, 3]]
  outs = jinfer.generate(model, prompts, jinfer.SamplingParams(max_tokens=8, temperature=0.0,
                                                               ignore_eos=True))
  for prompt, out in zip(prompts, outs):
    # No eos in the transformers config (and ignore_eos here): both run exactly 8 steps.
    prompt_t = torch.tensor([prompt])
    with torch.no_grad():
      ref = ref_model.generate(prompt_t, attention_mask=torch.ones_like(prompt_t),
                               do_sample=False, max_new_tokens=8, eos_token_id=None,
                               pad_token_id=0)
    ref_ids = ref[0, len(prompt):].tolist()
    assert len(ref_ids) == 8
    assert out.token_ids == ref_ids
