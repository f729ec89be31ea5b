"""`jinfer evaluate`: the perplexity of a model on a text.

  jinfer evaluate --quantize=int8 --kv_cache_dtype=int8 [--text_file=notes.txt]

prints the perplexity on the text kept in jinfer/data (Chapter I of Alice's Adventures in
Wonderland, about 2.9k SmolLM2 tokens) or on --text_file.
"""

from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  from jinfer.quant.weights import MODES  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Model name or path.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
  flags.DEFINE_enum("quantize", None, list(MODES), "Quantize the weights after loading.")
  flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8"], "KV cache format.")
  flags.DEFINE_string("text_file", None, "UTF-8 text to measure (default: jinfer/data's text).")
  flags.DEFINE_integer("chunk_size", 512, "Tokens per forward pass through the cache.",
                       lower_bound=1)


def main(argv) -> None:
  del argv
  import jinfer  # pylint: disable=g-import-not-at-top
  from jinfer import evaluate  # pylint: disable=g-import-not-at-top
  # The file is read before the model loads: a bad path costs no load time.
  text = evaluate.read_text_file(FLAGS.text_file) if FLAGS.text_file is not None else None
  model = jinfer.load_model(FLAGS.model, dtype=FLAGS.dtype, quantize=FLAGS.quantize,
                            kv_cache_dtype=FLAGS.kv_cache_dtype)
  print(f"perplexity: {jinfer.perplexity(model, text, chunk_size=FLAGS.chunk_size):.4f}")
