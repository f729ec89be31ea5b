"""Checkpoint loading: GGUF, Hugging Face safetensors, jinfer Orbax; model registry and fetching.

All loaders return (LlamaConfig, params, Tokenizer) with params in the layout the model expects.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from jinfer.checkpoints import orbax_io
from jinfer.checkpoints.gguf_loader import load_gguf, load_gguf_params
from jinfer.checkpoints.hf_loader import load_hf_dir, load_hf_params
from jinfer.checkpoints.registry import (DEFAULT_MODEL, REGISTRY, RegistryEntry, cache_dir,
                                         fetch, resolve)
from jinfer.checkpoints.orbax_io import is_orbax_checkpoint
from jinfer.checkpoints.orbax_io import load as load_orbax
from jinfer.checkpoints.orbax_io import save as save_orbax
from jinfer.checkpoints.validation import check_params
from jinfer.models.config import LlamaConfig

if TYPE_CHECKING:
  from jinfer.tokenizers import Tokenizer


def load_checkpoint(name_or_path: str | os.PathLike, **resolve_kwargs: Any
                    ) -> tuple[LlamaConfig, dict[str, Any], "Tokenizer"]:
  """Resolves any accepted model reference (see `resolve`) and loads it."""
  kind, path = resolve(name_or_path, **resolve_kwargs)
  if kind == "gguf":
    return load_gguf(path)
  if kind == "hf":
    return load_hf_dir(path)
  return load_orbax(path)


__all__ = [
    "DEFAULT_MODEL", "REGISTRY", "RegistryEntry", "cache_dir", "fetch", "resolve",
    "load_checkpoint", "load_gguf", "load_gguf_params", "load_hf_dir", "load_hf_params",
    "orbax_io", "save_orbax", "load_orbax", "is_orbax_checkpoint", "check_params",
]
