"""`jinfer evaluate`: the perplexity of a model on a text.

  jinfer evaluate --quantize=int8 --kv_cache_dtype=int8 [--text_file=notes.txt]

prints the perplexity on the text kept in jinfer/data (Chapter I of Alice's Adventures in
Wonderland, about 2.9k SmolLM2 tokens) or on --text_file.
"""

from absl import flags

from jinfer import cli

FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS) -> None:
  """Defines this command's flags in `flag_values` (absl's global FLAGS when it runs)."""
  flags = cli.bound_flags(flag_values)  # shadows absl.flags here: DEFINE_* into flag_values
  from jinfer.quant.weights import MODES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or path.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
  flags.DEFINE_enum("quantize", None, list(MODES), "Quantize the weights after loading.")
  flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "KV cache format.")
  flags.DEFINE_string("text_file", None, "UTF-8 text to measure (default: jinfer/data's text).")
  flags.DEFINE_integer("chunk_size", 512, "Tokens per forward pass through the cache.",
                       lower_bound=1)


def main(argv) -> None:
  """Loads the model and prints its perplexity on --text_file (default: jinfer/data's text)."""
  del argv
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer import evaluate  # pylint: disable=g-import-not-at-top
  # The file is read before the model loads: a bad path costs no load time.
  text = evaluate.read_text_file(FLAGS.text_file) if FLAGS.text_file is not None else None
  model = jinfer.load_model(FLAGS.model, dtype=FLAGS.dtype, quantize=FLAGS.quantize,
                            kv_cache_dtype=FLAGS.kv_cache_dtype)
  print(f"perplexity: {jinfer.perplexity(model, text, chunk_size=FLAGS.chunk_size):.4f}")
