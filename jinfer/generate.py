r"""Generates text with a model from the command line.

  python -m jinfer.generate --prompt="What is the capital of France?" --chat

Prints the completion, then compile time, prefill time and decode speed on separate lines.
(`jinfer.generate`, the function, is what `import jinfer` gives; this file is the command line.)
"""

import sys

from absl import app
from absl import flags

_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "Prompt text.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt as a user message in the chat template.")
_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct",
    "Registry name, .gguf file, Hugging Face directory or jinfer Orbax checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl", "auto", ["auto", "xla", "pallas"],
    "Decode attention: xla (contiguous cache), pallas (paged cache + Pallas kernel; interpreted, "
    "slow, on CPU) or auto (pallas on TPU/GPU, xla on CPU).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "w8a8", "int4"],
                              "Quantize the weights after loading.")
_KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"],
                                    "KV cache format: the model dtype, or int8 with scales.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this mass.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: random).")


def main(argv):
  del argv
  import jinfer  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  try:
    _generate(jinfer)
  except jinfer.JinferError as e:  # bad model name, file or request: the message says the fix
    sys.exit(f"error: {e}")


def _generate(jinfer):
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  model = jinfer.load_model(_MODEL.value, dtype=_DTYPE.value,
                            attention_impl=_ATTENTION_IMPL.value, quantize=_QUANTIZE.value,
                            kv_cache_dtype=_KV_CACHE_DTYPE.value)
  prompt = _PROMPT.value
  if _CHAT.value:
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  params = jinfer.SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
                                 top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  (completion,), stats = generate_with_stats(model, [prompt], params)
  print(completion.text)
  print(f"compile: {stats.compile_s:.2f} s")
  print(f"prefill: {stats.prefill_s * 1e3:.1f} ms ({stats.prompt_tokens} prompt tokens)")
  print(f"decode: {stats.decode_tokens_per_s:.1f} tok/s "
        f"({stats.generated_tokens} tokens after the first, finish_reason={completion.finish_reason})")


if __name__ == "__main__":
  app.run(main)
