"""Shared fixtures: the real SmolLM2 file (fetched once into the jinfer cache) and tiny models."""

import jax
import pytest

import jinfer
from jinfer.models import config as config_lib
from jinfer.models import llama


@pytest.fixture(scope="session")
def smollm2_gguf_path():
  from jinfer.checkpoints import registry
  return registry.fetch(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
  """The real default model in float32."""
  return jinfer.load_model(str(smollm2_gguf_path), dtype="float32")


class ByteTokenizer:
  """Bytes as tokens (ids 0..255), EOS 255: enough to drive tiny random models."""

  eos_ids = frozenset({255})
  vocab_size = 256

  def encode(self, text, add_bos=None):
    return list(text.encode())

  def decode(self, ids, skip_special_tokens=False):
    data = bytes(i for i in ids if not (skip_special_tokens and i in self.eos_ids))
    return data.decode(errors="replace")


@pytest.fixture(scope="session")
def tiny_model():
  cfg = config_lib.TINY_GQA
  return jinfer.Model(cfg, llama.init_params(cfg, jax.random.key(0)), ByteTokenizer())
