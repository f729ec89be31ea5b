"""Checks of request values at jinfer's boundary, in one place.

Every public entry point (SamplingParams, BeamSearchParams, SpeculativeConfig, generate,
beam_search, Model.logits, perplexity, load_model) validates its inputs with these before any
work is done. A bad value raises `InvalidRequestError` naming the field, what it accepts and what
was given. Nothing is coerced: 2.5 is not an integer, "no" is not a bool, 1.7 is not a token id,
inf is not a temperature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from jinfer.errors import InvalidRequestError


def check_request(ok: bool, message: str) -> None:
  """Raises InvalidRequestError(message) unless `ok`."""
  if not ok:
    raise InvalidRequestError(message)


def is_integer(x) -> bool:
  """True for Python and numpy integers, not bools."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_number(x) -> bool:
  """True for finite Python and numpy ints and floats, not bools (nor ints too big for a float)."""
  if not (is_integer(x) or isinstance(x, (float, np.floating))):
    return False
  try:
    return math.isfinite(float(x))
  except OverflowError:
    return False


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
  """' in [low, high]', ' >= low', ... or '' for no bounds."""
  if low is not None and high is not None:
    return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  if low is not None:
    return f" {'>' if low_open else '>='} {low}"
  if high is not None:
    return f" {'<' if high_open else '<='} {high}"
  return ""


def _in_range(x, low, high, low_open: bool, high_open: bool) -> bool:
  return ((low is None or (x > low if low_open else x >= low))
          and (high is None or (x < high if high_open else x <= high)))


def integer(name: str, value, *, low=None, high=None, hint: str = "") -> int:
  """`value` as a Python int, if it is an integer in [low, high]."""
  check_request(is_integer(value) and _in_range(value, low, high, False, False),
                f"{name} must be an integer{_range_text(low, high, False, False)}{hint}, "
                f"got {value!r}.")
  return int(value)


def number(name: str, value, *, low=None, high=None, low_open: bool = False,
           high_open: bool = False, hint: str = "") -> float:
  """`value` as a Python float, if it is a finite real number in the range."""
  check_request(is_number(value) and _in_range(float(value), low, high, low_open, high_open),
                f"{name} must be a finite number{_range_text(low, high, low_open, high_open)}"
                f"{hint}, got {value!r}.")
  return float(value)


def boolean(name: str, value) -> bool:
  """`value` as a bool; refuses anything but True/False (numpy bools included)."""
  check_request(isinstance(value, (bool, np.bool_)), f"{name} must be True or False, got {value!r}.")
  return bool(value)


def text(name: str, value, *, allow_empty: bool = False) -> str:
  """A str that is valid Unicode text (no lone surrogates, which no tokenizer can encode)."""
  check_request(isinstance(value, str), f"{name} must be a string, got {type(value).__name__} "
                f"{value!r:.80}.")
  check_request(allow_empty or bool(value), f"{name} must not be empty.")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise InvalidRequestError(
        f"{name} is not valid Unicode text: {e.reason} at character {e.start} "
        f"({value[e.start:e.end]!r}); remove or replace it.") from None
  return value


def strings(name: str, value, *, allow_blank: bool = False) -> tuple[str, ...]:
  """One string or a sequence of non-empty strings, as a tuple of str."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, str):
    value = (value,)
  check_request(isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, bytes),
                f"{name} must be a string or a list of strings, got {type(value).__name__}.")
  items = tuple(str(text(f"{name}[{i}]", v)) for i, v in enumerate(value))
  check_request(allow_blank or all(s.strip() for s in items),
                f"{name} must be non-blank strings, got {items!r}.")
  return items


def token_ids(name: str, value, vocab_size: Optional[int] = None, *,
              allow_empty: bool = False) -> list[int]:
  """A sequence of integer token ids (each in [0, vocab_size) when that is given)."""
  check_request(_is_sequence(value), f"{name} must be a list of integer token ids, got "
                f"{type(value).__name__} {value!r:.80}.")
  if _is_array(value):
    value = np.asarray(value)
    check_request(value.dtype.kind in "iu", f"{name} must hold integer token ids, got an array "
                  f"of {value.dtype}.")
    value = value.tolist()
  bad = [t for t in value if not is_integer(t)]
  check_request(not bad, f"{name} must hold integer token ids; {bad[:3]!r} are not integers "
                "(floats, bools and strings are not token ids).")
  ids = [int(t) for t in value]
  check_request(allow_empty or bool(ids), f"{name} is empty; give at least one token.")
  if vocab_size is not None:
    out = [t for t in ids if not 0 <= t < vocab_size]
    check_request(not out, f"{name} has token ids outside the vocabulary [0, {vocab_size}): "
                  f"{out[:5]}.")
  return ids


def token_matrix(name: str, value, vocab_size: int, max_len: int) -> np.ndarray:
  """[B, T] int32 token ids: a 2-D integer array, or B lists of T integer ids, T <= max_len."""
  if _is_array(value):
    array = np.asarray(value)
    check_request(array.ndim == 2 and array.dtype.kind in "iu",
                  f"{name} must be integer token ids of shape [batch, length], got shape "
                  f"{array.shape} dtype {array.dtype}.")
    rows = array.tolist()
  else:
    check_request(_is_sequence(value) and all(map(_is_sequence, value)),
                  f"{name} must be a list of token-id lists (shape [batch, length]), got "
                  f"{value!r:.80}.")
    rows = value
  check_request(len(rows) > 0, f"{name} is empty; give at least one row of token ids.")
  rows = [token_ids(f"{name}[{b}]", row, vocab_size) for b, row in enumerate(rows)]
  lengths = sorted({len(row) for row in rows})
  check_request(len(lengths) == 1, f"{name} rows have different lengths {lengths[:4]}; pad them "
                "to one length (or score them one at a time).")
  check_request(lengths[0] <= max_len, f"{name} has {lengths[0]} tokens per row, more than the "
                f"model's context of {max_len}; split it.")
  return np.asarray(rows, np.int32)


def _is_sequence(value) -> bool:
  if _is_array(value):
    return value.ndim == 1
  return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _is_array(value) -> bool:
  """A numpy or jax array (anything with a shape and a dtype)."""
  return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "ndim")


Prompt = Union[str, Sequence[int]]


def prompts(value, vocab_size: Optional[int] = None) -> list[Prompt]:
  """A batch of prompts: each a string or a list of token ids. A 2-D integer numpy array is a
  batch of equal-length token-id prompts; an empty batch is refused."""
  if _is_array(value):
    value = np.asarray(value)
    check_request(value.ndim == 2 or (value.ndim == 1 and value.dtype.kind in "OU"),
                  "a numpy array of prompts must be [batch, length] integer token ids or a 1-D "
                  f"array of strings; got shape {value.shape} dtype {value.dtype}.")
    value = list(value)
  check_request(not isinstance(value, (str, bytes)) and isinstance(value, Sequence),
                "prompts must be a list of prompts (strings or token-id lists); wrap a single "
                f"prompt in a list. Got {type(value).__name__} {value!r:.80}.")
  check_request(len(value) > 0, "prompts is empty; give at least one prompt.")
  check_request(not is_integer(value[0]),
                "prompts must be a list of prompts, got a flat list of token ids; wrap a single "
                "prompt in a list: [[1, 2, 3]].")
  out = []
  for i, prompt in enumerate(value):
    if isinstance(prompt, (str, np.str_)):
      out.append(text(f"prompt {i}", str(prompt)))
    else:
      out.append(token_ids(f"prompt {i}", prompt, vocab_size))
  return out


def fits_context(index: int, prompt_len: int, max_tokens: int, context: int,
                 limit: str = "the model's context") -> None:
  """Prompt `index` and the tokens it asks for must fit the context window (`limit` names it)."""
  check_request(prompt_len + max_tokens <= context,
                f"prompt {index} has {prompt_len} tokens and asks for max_tokens={max_tokens}, "
                f"more than {limit} of {context}; shorten the prompt or max_tokens.")


def model(value) -> None:
  """A jinfer Model (load_model's result), not a name, config or params."""
  from jinfer.model import Model  # pylint: disable=g-import-not-at-top  (model imports us)
  check_request(isinstance(value, Model), f"model must be a jinfer.Model (from "
                f"jinfer.load_model), got {type(value).__name__}.")


def mapping(name: str, value) -> Mapping:
  """`value`, checked to be a mapping."""
  check_request(isinstance(value, Mapping), f"{name} must be a dict, got {type(value).__name__}.")
  return value


def one_of(name: str, value, accepted: Sequence[Any]) -> Any:
  """`value`, checked to equal one of `accepted` with the same type (1 is not True)."""
  check_request(any(value is a or (type(value) is type(a) and value == a) for a in accepted),
                f"{name} must be one of {list(accepted)}, got {value!r}.")
  return value
