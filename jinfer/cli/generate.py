"""`jinfer generate`: completes one prompt and prints the text, then its timings.

  jinfer generate --prompt="What is the capital of France?" --chat

Prints the completion, then compile time, prefill time and decode speed on separate lines.
"""

from absl import flags

from jinfer import cli

FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS) -> None:
  """Defines this command's flags in `flag_values` (absl's global FLAGS when it runs)."""
  flags = cli.bound_flags(flag_values)  # shadows absl.flags here: DEFINE_* into flag_values
  from jinfer.quant.weights import MODES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("prompt", "What is the capital of France?", "Prompt text.")
  flags.DEFINE_bool("chat", False, "Wrap the prompt as a user message in the chat template.")
  flags.DEFINE_string(
      "model", "smollm2-135m-instruct",
      "Registry name, .gguf file, Hugging Face directory or jinfer Orbax checkpoint.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
  flags.DEFINE_enum(
      "attention_impl", "auto", ["auto", "xla", "pallas"],
      "Decode attention: xla (contiguous cache), pallas (paged cache + Pallas kernel; "
      "interpreted, slow, on CPU) or auto (pallas on TPU/GPU, xla on CPU).")
  flags.DEFINE_enum("quantize", None, list(MODES), "Quantize the weights after loading.")
  flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"],
                    "KV cache format: the model dtype, or int8 with scales.")
  flags.DEFINE_integer("max_tokens", 64, "Most tokens to generate.", lower_bound=1)
  flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this mass.")
  flags.DEFINE_integer("seed", None, "Sampling seed, any integer (default: random).")
  flags.DEFINE_string(
      "mesh", None, "Shard over a device mesh, e.g. 'data:1,model:-1' (-1: the devices left; "
      "tensor parallel over model, rows over data). Default: one device.")


def main(argv) -> None:
  """Checks the request, loads the model, completes --prompt and prints the text and timings."""
  del argv
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer import validation  # pylint: disable=g-import-not-at-top
  from jinfer.decoding.generate import generate_with_stats  # pylint: disable=g-import-not-at-top
  if not FLAGS.prompt.strip():
    raise jinfer.InvalidRequestError("--prompt is empty; pass the text to complete, e.g. "
                                     "--prompt='What is the capital of France?'.")
  validation.text("--prompt", FLAGS.prompt)
  # The request is checked before the model loads, so a bad flag costs no load time.
  params = jinfer.SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                 top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
  mesh = None if FLAGS.mesh is None else parse_mesh(FLAGS.mesh)
  model = jinfer.load_model(FLAGS.model, dtype=FLAGS.dtype, attention_impl=FLAGS.attention_impl,
                            quantize=FLAGS.quantize, kv_cache_dtype=FLAGS.kv_cache_dtype,
                            mesh=mesh)
  prompt = FLAGS.prompt
  if FLAGS.chat:
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  (completion,), stats = generate_with_stats(model, [prompt], params)
  print(completion.text)
  if model.mesh is not None:
    print(f"mesh: {dict(model.mesh.shape)} over {model.mesh.devices.size} devices")
  print(f"compile: {stats.compile_s:.2f} s")
  print(f"prefill: {stats.prefill_s * 1e3:.1f} ms ({stats.prompt_tokens} prompt tokens)")
  speed = (f"{stats.decode_tokens_per_s:.1f} tok/s" if stats.generated_tokens
           else "n/a (prefill made the only token)")
  print(f"decode: {speed} ({stats.generated_tokens} tokens after the first, "
        f"finish_reason={completion.finish_reason})")


def parse_mesh(text: str) -> dict[str, int]:
  """'data:2,model:-1' -> {'data': 2, 'model': -1} (checked by jinfer.sharding.make_mesh)."""
  from jinfer.errors import InvalidRequestError  # pylint: disable=g-import-not-at-top
  sizes = {}
  for part in text.split(","):
    name, _, size = part.partition(":")
    try:
      sizes[name.strip()] = int(size)
    except ValueError:
      raise InvalidRequestError(f"--mesh must look like 'data:1,model:-1'; got {text!r}.") from None
  return sizes
