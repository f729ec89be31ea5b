"""Saves and loads jinfer checkpoints: Orbax params + JSON config + tokenizer files.

Layout of a checkpoint directory:
  jinfer_config.json   {"format": "jinfer-orbax", "version": 1, "config": {...LlamaConfig...},
                        "quantization": null or {"mode", "group_size", "embeddings"}}
  params/              an Orbax PyTree checkpoint; dtypes are kept as saved (bf16, int8, ...);
                       quantized weights are {"codes", "scales"[, "offsets"]} dicts
  tokenizer/           whatever Tokenizer.save writes (tokenizer.json, tokenizer_config.json)
Everything is written to a hidden sibling temp directory and renamed into place at the end, so
an interrupted save leaves no directory at `path` (and an interrupted overwrite leaves the old
checkpoint).

Params are written with Orbax but read back with synchronous TensorStore reads of the arrays
Orbax's params/_METADATA lists: Orbax's own restore runs TensorStore reads on a private asyncio
loop that it closes as soon as one read fails, and every read still in flight then reports
"Event loop is closed" on stderr (hundreds of tracebacks for a damaged real model).
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
import orbax.checkpoint as ocp
import tensorstore as ts

from jinfer.checkpoints import validation
from jinfer.errors import CheckpointError, ConfigError
from jinfer.models.config import LlamaConfig, RopeScaling, invalid_config
from jinfer.quant import weights as quant_weights

if TYPE_CHECKING:
  from jinfer.tokenizers import Tokenizer

Params = dict[str, Any]

FORMAT = "jinfer-orbax"
FORMAT_VERSION = 1  # bump when the params layout (models/llama.py pack_layer) changes
CONFIG_FILE = "jinfer_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
PARAMS_METADATA = "_METADATA"  # Orbax's record of the params tree and how its arrays are stored
_SEQUENCE_KEY = 1  # orbax KeyType.SEQUENCE (list index); 2 is a dict key
_ARRAY_VALUE_TYPES = ("jax.Array", "np.ndarray")
# What TensorStore raises for unreadable data (its status errors are ValueErrors).
_READ_ERRORS = (ValueError, OSError, RuntimeError, TypeError)


def save(path: str | os.PathLike, config: LlamaConfig, params: Params, tokenizer: "Tokenizer",
         *, overwrite: bool = False) -> Path:
  """Writes a checkpoint atomically; returns its absolute path.

  overwrite: replace an existing jinfer checkpoint at `path` (only once the new one is fully
  written). A path holding anything else is never replaced.
  """
  path = Path(path).expanduser().absolute()
  # Checked before the params are written: a tokenizer that cannot be stored fails fast.
  if not callable(getattr(tokenizer, "save", None)):
    raise CheckpointError(
        f"cannot save to '{path}': the tokenizer ({type(tokenizer).__name__}) has no "
        "save(directory) method, and a jinfer checkpoint stores its tokenizer. Use a "
        "jinfer.tokenizers.Tokenizer (as load_model returns).")
  if path.exists() or path.is_symlink():
    if not overwrite:
      raise CheckpointError(
          f"'{path}' already exists; choose another path or pass overwrite=True to replace it.")
    if not _is_jinfer_dir(path):
      raise CheckpointError(
          f"'{path}' exists and is not a jinfer checkpoint (no {CONFIG_FILE} of format "
          f"'{FORMAT}'); overwrite=True only replaces jinfer checkpoints. Choose another path, "
          "or remove it yourself if it really should go.")
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


def _is_jinfer_dir(path: Path) -> bool:
  """A directory `save` wrote, complete or not (what overwrite=True may replace)."""
  try:
    meta = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return False
  return path.is_dir() and isinstance(meta, dict) and meta.get("format") == FORMAT


def _move_into_place(tmp: Path, path: Path) -> None:
  if not (path.exists() or path.is_symlink()):
    os.rename(tmp, path)
    return
  # Two renames on one filesystem: the old checkpoint is set aside, never deleted, until the
  # new one is in place, and put back if that fails.
  old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
  os.rename(path, old / "ckpt")
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(old / "ckpt", path)
    old.rmdir()
    raise
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
  """Like `load` without the tokenizer.

  The config, the params' layout and every array's shape are checked against each other before
  any array data is read.
  """
  path = Path(path)
  if not is_orbax_checkpoint(path):
    raise CheckpointError(
        f"'{path}' is not a complete jinfer Orbax checkpoint (it needs {CONFIG_FILE}, "
        f"{PARAMS_DIR}/ and {TOKENIZER_DIR}/); it may be from an interrupted save. "
        "Save it again with jinfer.checkpoints.orbax_io.save.")
  config_file = path / CONFIG_FILE
  meta = json.loads(config_file.read_text())
  if meta.get("version") != FORMAT_VERSION:
    raise CheckpointError(
        f"'{path}' has checkpoint format version {meta.get('version')}; this jinfer reads "
        f"version {FORMAT_VERSION}. Re-save it with this version of jinfer.")
  if not isinstance(meta.get("config"), dict):
    raise CheckpointError(f"'{config_file}' has no \"config\" object; restore the file or save "
                          "the checkpoint again.")
  config = config_from_dict(meta["config"], source=f"'{config_file}'")
  quantization = _quantization(meta.get("quantization"), config_file)
  arrays = _ParamsReader(path / PARAMS_DIR)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype.numpy_dtype),
                        arrays.stores)
  validation.check_params(_restore_quantized(shapes, quantization, config_file), config,
                          f"'{config_file}'")
  return config, _restore_quantized(arrays.read(), quantization, config_file)


def _quantization(record: Any, config_file: Path) -> dict[str, Any] | None:
  if record is None:
    return None
  if not isinstance(record, dict) or record.get("mode") not in quant_weights.MODES:
    raise CheckpointError(
        f"'{config_file}' field \"quantization\" is {record!r}; expected null or an object whose "
        f"\"mode\" is one of {list(quant_weights.MODES)}. Restore the file or save the "
        "checkpoint again.")
  return record


def _restore_quantized(params: Params, quantization: dict[str, Any] | None,
                       config_file: Path) -> Params:
  try:
    return quant_weights.restore(params, quantization)
  except (KeyError, TypeError, IndexError) as e:
    raise CheckpointError(
        f"'{config_file}' records {quantization['mode']} weights, but the params have no "
        f"quantized codes/scales where it expects them ({type(e).__name__}: {e}). Restore the "
        "\"quantization\" field or save the checkpoint again.") from e


class _ParamsReader:
  """The arrays of an Orbax PyTree checkpoint, opened (metadata only) with synchronous TensorStore.

  `stores` is the params tree with a TensorStore per array; `read()` the same tree of numpy
  arrays. Every operation is waited for before returning or raising, so a damaged file leaves
  no read running behind the error.
  """

  def __init__(self, params_dir: Path):
    self._dir = params_dir
    names, self._tree_def, store_meta = self._read_metadata(params_dir)
    self._names = names
    use_ocdbt = store_meta.get("use_ocdbt")
    if use_ocdbt is None:  # older Orbax: an OCDBT checkpoint is one with a manifest
      use_ocdbt = (params_dir / "manifest.ocdbt").exists()
    kvstore = ({"driver": "ocdbt", "base": f"file://{params_dir}/"} if use_ocdbt
               else {"driver": "file", "path": f"{params_dir}/"})
    driver = "zarr3" if store_meta.get("use_zarr3", False) else "zarr"
    context = ts.Context()  # shared: the OCDBT index is read once for all arrays
    opening = [ts.open({"driver": driver, "kvstore": dict(kvstore, path=name)}, open=True,
                       read=True, context=context) for name in names]
    stores = self._wait(opening, "cannot be opened")
    self.stores = jax.tree.unflatten(self._tree_def, stores)

  def read(self) -> Params:
    stores = jax.tree.leaves(self.stores)
    arrays = self._wait([store.read() for store in stores], "cannot be read")
    return jax.tree.unflatten(self._tree_def, arrays)

  def _wait(self, futures: list[Any], what: str) -> list[Any]:
    results, first_error = [], None
    for name, future in zip(self._names, futures):
      try:
        results.append(future.result())
      except _READ_ERRORS as e:
        first_error = first_error or (name, e)
    if first_error is not None:
      name, e = first_error
      detail = str(e).split(" [tensorstore_spec=")[0]  # the spec is long and says nothing new
      raise CheckpointError(
          f"param '{name}' in '{self._dir}' {what}: the checkpoint's data files are truncated "
          f"or corrupt ({detail}). Save the checkpoint again.") from e
    return results

  @staticmethod
  def _read_metadata(params_dir: Path) -> tuple[list[str], Any, dict[str, Any]]:
    """(array names in tree order, tree structure, storage options) from Orbax's _METADATA."""
    meta_file = params_dir / PARAMS_METADATA
    fix = "the params were not completely written or were damaged; save the checkpoint again."
    try:
      meta = json.loads(meta_file.read_text())
    except FileNotFoundError as e:
      raise CheckpointError(f"'{meta_file}' is missing: {fix}") from e
    except (OSError, ValueError) as e:
      raise CheckpointError(f"'{meta_file}' is unreadable ({e}): {fix}") from e
    entries = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(entries, dict) or not entries:
      raise CheckpointError(f"'{meta_file}' lists no params (no \"tree_metadata\"): {fix}")
    tree: dict[Any, Any] = {}
    try:
      for entry in entries.values():
        if entry["value_metadata"]["value_type"] not in _ARRAY_VALUE_TYPES:
          raise ValueError(f"entry of type {entry['value_metadata']['value_type']!r}")
        keys = [str(k["key"]) for k in entry["key_metadata"]]
        node = tree
        for key in keys[:-1]:
          node = node.setdefault(key, {})
        node[keys[-1]] = ".".join(keys)  # Orbax's array name
      tree = _lists_where_sequences(tree, entries)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
      raise CheckpointError(f"'{meta_file}' is malformed ({type(e).__name__}: {e}): {fix}") from e
    names, tree_def = jax.tree.flatten(tree)
    return names, tree_def, meta


def _lists_where_sequences(tree: dict[str, Any], entries: dict[str, Any]) -> Any:
  """Turns the dicts Orbax recorded as sequences (keys '0', '1', ...) back into lists."""
  sequences = set()
  for entry in entries.values():
    keys = entry["key_metadata"]
    for depth, k in enumerate(keys):
      if k["key_type"] == _SEQUENCE_KEY:
        sequences.add(tuple(str(parent["key"]) for parent in keys[:depth]))

  def convert(node: Any, where: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
      return node
    children = {key: convert(child, (*where, key)) for key, child in node.items()}
    if where not in sequences:
      return children
    if sorted(children, key=int) != [str(i) for i in range(len(children))]:
      raise ValueError(f"list '{'.'.join(where)}' has indices {sorted(children)}")
    return [children[str(i)] for i in range(len(children))]

  return convert(tree, ())


def config_from_dict(d: dict[str, Any], source: str = CONFIG_FILE) -> LlamaConfig:
  """Inverse of dataclasses.asdict(LlamaConfig); bad fields are a CheckpointError naming
  `source`."""
  fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise CheckpointError(
        f"checkpoint config {source} has fields {unknown} that this jinfer's LlamaConfig lacks; "
        "upgrade jinfer or re-save the checkpoint with this version.")
  missing = [name for name, f in fields.items() if name not in d
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise CheckpointError(f"checkpoint config {source} lacks fields {missing}; restore the file "
                          "or save the checkpoint again.")
  d = dict(d)
  try:
    if d.get("rope_scaling") is not None:
      scaling = d["rope_scaling"]
      scaling_fields = {f.name for f in dataclasses.fields(RopeScaling)}
      if not isinstance(scaling, dict) or set(scaling) - scaling_fields:
        raise CheckpointError(
            f"checkpoint config {source} field rope_scaling is {scaling!r}; expected null or an "
            f"object with fields among {sorted(scaling_fields)}. Restore the file or save the "
            "checkpoint again.")
      d["rope_scaling"] = RopeScaling(**scaling)
    return LlamaConfig(**d)
  except ConfigError as e:
    raise invalid_config(source, e) from e
