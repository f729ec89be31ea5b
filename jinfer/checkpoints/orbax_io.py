"""Saves and loads jinfer checkpoints: Orbax params + JSON config + tokenizer files.

Layout of a checkpoint directory:
  jinfer_config.json   {"format": "jinfer-orbax", "version": 1, "config": {...LlamaConfig...},
                        "quantization": null or {"mode", "group_size", "embeddings"}}
  params/              an Orbax PyTree checkpoint; dtypes are kept as saved (bf16, int8, ...);
                       quantized weights are {"codes", "scales"[, "offsets"]} dicts
  tokenizer/           whatever Tokenizer.save writes (tokenizer.json, tokenizer_config.json)
Everything is written to a hidden sibling temp directory and renamed into place at the end, so
an interrupted save leaves no directory at `path`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jinfer.errors import CheckpointError
from jinfer.models.config import LlamaConfig, RopeScaling
from jinfer.quant import weights as quant_weights

if TYPE_CHECKING:
  from jinfer.tokenizers import Tokenizer

Params = dict[str, Any]

FORMAT = "jinfer-orbax"
FORMAT_VERSION = 1  # bump when the params layout (models/llama.py pack_layer) changes
CONFIG_FILE = "jinfer_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def save(path: str | os.PathLike, config: LlamaConfig, params: Params, tokenizer: "Tokenizer",
         *, overwrite: bool = False) -> Path:
  """Writes a checkpoint atomically; returns its absolute path."""
  path = Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise CheckpointError(
        f"'{path}' already exists; choose another path or pass overwrite=True to replace it.")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    ocp.PyTreeCheckpointer().save(tmp / PARAMS_DIR, quant_weights.to_plain(params))
    (tmp / TOKENIZER_DIR).mkdir()
    tokenizer.save(tmp / TOKENIZER_DIR)
    # Written last: a directory without it is never taken for a checkpoint.
    (tmp / CONFIG_FILE).write_text(json.dumps(
        {"format": FORMAT, "version": FORMAT_VERSION, "config": dataclasses.asdict(config),
         "quantization": quant_weights.describe(params)}, indent=2))
    _move_into_place(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _move_into_place(tmp: Path, path: Path) -> None:
  if not path.exists():
    os.rename(tmp, path)
    return
  old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
  os.rename(path, old / "ckpt")
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  """True for a complete directory written by `save`."""
  path = Path(path)
  try:
    meta = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(meta, dict) and meta.get("format") == FORMAT
          and (path / PARAMS_DIR).is_dir() and (path / TOKENIZER_DIR).is_dir())


def load(path: str | os.PathLike) -> tuple[LlamaConfig, Params, "Tokenizer"]:
  """Returns (config, params as numpy arrays in their saved dtypes, tokenizer)."""
  from jinfer.tokenizers import Tokenizer  # Imported late: tokenizers imports nothing from here.

  config, params = load_params(path)
  return config, params, Tokenizer.from_hf_dir(Path(path) / TOKENIZER_DIR)


def load_params(path: str | os.PathLike) -> tuple[LlamaConfig, Params]:
  """Like `load` without the tokenizer."""
  path = Path(path)
  if not is_orbax_checkpoint(path):
    raise CheckpointError(
        f"'{path}' is not a complete jinfer Orbax checkpoint (it needs {CONFIG_FILE}, "
        f"{PARAMS_DIR}/ and {TOKENIZER_DIR}/); it may be from an interrupted save. "
        "Save it again with jinfer.checkpoints.orbax_io.save.")
  meta = json.loads((path / CONFIG_FILE).read_text())
  if meta.get("version") != FORMAT_VERSION:
    raise CheckpointError(
        f"'{path}' has checkpoint format version {meta.get('version')}; this jinfer reads "
        f"version {FORMAT_VERSION}. Re-save it with this version of jinfer.")
  params = _restore_params(path / PARAMS_DIR)
  return config_from_dict(meta["config"]), quant_weights.restore(params, meta.get("quantization"))


def _restore_params(path: Path) -> Params:
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    tree = checkpointer.metadata(path).item_metadata.tree
    # numpy on the host: the caller decides placement and sharding.
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=args)
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"Orbax params in '{path}' are unreadable ({e}); save them again.") from e


def config_from_dict(d: dict[str, Any]) -> LlamaConfig:
  """Inverse of dataclasses.asdict(LlamaConfig)."""
  known = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise CheckpointError(
        f"checkpoint config has fields {unknown} that this jinfer's LlamaConfig lacks; "
        "upgrade jinfer or re-save the checkpoint with this version.")
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return LlamaConfig(**d)
