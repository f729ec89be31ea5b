"""Tokenizers: GGUF vocabularies, tokenizer.json, sentencepiece; chat templates; streaming decode.

One `Tokenizer` class fronts two backends:
  * the `tokenizers` library (byte-level BPE from a GGUF, or any `tokenizer.json`), and
  * `sentencepiece` (a `tokenizer.model`, or a GGUF 'llama' vocabulary rebuilt as one).
BOS handling, special ids and chat templates live in `Tokenizer`, so both backends behave alike.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
import tempfile
import uuid
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from jinfer import validation
from jinfer.errors import CheckpointError, InvalidRequestError
from jinfer.validation import check_request

if TYPE_CHECKING:
  import gguf
  import tokenizers

PathLike = str | os.PathLike

# llama.cpp token types (the same numbers as sentencepiece's piece types).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of the pre-tokenizers llama.cpp knows (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's own regex (what ByteLevel(use_regex=True) applies), optionally after single digits.
_GPT2_PRE = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion")
_DIGITS_THEN_GPT2_PRE = (
    "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe",
                     "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# llama.cpp matches whole vocabulary entries before merging for these (tokenizer.json's
# `ignore_merges`).
_IGNORE_MERGES_PRE = frozenset(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"))

# Tokens of context decoded before new ones while streaming (vLLM's value).
_DETOKENIZE_WINDOW = 5
_SPECIAL_NAMES = ("bos", "eos", "unk", "pad")


# ---------------------------------------------------------------------------------------------
# Backends: the only code that knows which library does the work.


class _HFBackend:
  """A `tokenizers.Tokenizer` (byte-level BPE from GGUF, or any tokenizer.json)."""

  kind = "tokenizer.json"

  def __init__(self, tok: tokenizers.Tokenizer):
    self.tok = tok
    self.special_ids = frozenset(
        i for i, t in tok.get_added_tokens_decoder().items() if t.special)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
    # BOS is added by `Tokenizer`; the post-processor would add it a second time.
    tok = self._plain_text_tok if split_special_tokens else self.tok
    return tok.encode(text, add_special_tokens=False).ids

  @functools.cached_property
  def _plain_text_tok(self) -> tokenizers.Tokenizer:
    """A copy that encodes special-token strings as text (a copy, not a flag flipped on the
    shared tokenizer, so concurrent encodes never see each other's setting)."""
    tok = type(self.tok).from_str(self.tok.to_str())
    tok.encode_special_tokens = True
    return tok

  def encode_with_post_processor(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def id_to_piece(self, i: int) -> str | None:
    return self.tok.id_to_token(i)

  def piece_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)

  def save(self, directory: pathlib.Path) -> str:
    _write_atomic(directory / "tokenizer.json", self.tok.to_str(pretty=True).encode())
    return "PreTrainedTokenizerFast"


class _SentencePieceBackend:
  """A sentencepiece model; control pieces in the text are matched as special tokens."""

  kind = "tokenizer.model"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    self.proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    m = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    self.dummy_prefix = m.normalizer_spec.add_dummy_prefix
    # Text after a special token gets no dummy-prefix space (tokenizers' prepend_scheme
    # "first", as transformers does), so keep a processor that never adds it.
    m.normalizer_spec.add_dummy_prefix = False
    self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    n = self.sp.get_piece_size()
    self.special_ids = frozenset(i for i in range(n) if self.sp.is_control(i))
    self.byte_value = {
        i: int(self.sp.id_to_piece(i)[3:5], 16) for i in range(n) if self.sp.is_byte(i)}
    self.unk_ids = frozenset(i for i in range(n) if self.sp.is_unknown(i))
    specials = {self.sp.id_to_piece(i): i for i in self.special_ids}
    specials = {p: i for p, i in specials.items() if p}
    self.special_by_piece = specials
    self.special_re = (
        re.compile("|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True)))
        if specials else None)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
    if split_special_tokens:  # sentencepiece itself never matches control pieces in text
      return self._encode_plain(text, at_start=True)
    ids, pos = [], 0
    matches = self.special_re.finditer(text) if self.special_re else ()
    for m in matches:
      ids += self._encode_plain(text[pos:m.start()], at_start=pos == 0)
      ids.append(self.special_by_piece[m.group()])
      pos = m.end()
    return ids + self._encode_plain(text[pos:], at_start=pos == 0)

  def encode_with_post_processor(self, text: str) -> list[int]:
    return self.encode(text)

  def _encode_plain(self, text: str, at_start: bool) -> list[int]:
    if not text:
      return []
    return (self.sp if at_start else self.sp_no_prefix).encode(text)

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    # sentencepiece's own decode drops control pieces; transformers shows them unless skipped.
    out, first = bytearray(), True
    for i in ids:
      if i in self.special_ids:
        if not skip_special_tokens:
          out += self.sp.id_to_piece(i).encode()
        continue
      if i in self.byte_value:
        out.append(self.byte_value[i])
      elif i in self.unk_ids:
        out += " \u2047 ".encode()  # sentencepiece's surface form of <unk>
      else:
        piece = self.sp.id_to_piece(i).replace("\u2581", " ")
        if first and self.dummy_prefix and piece.startswith(" "):
          piece = piece[1:]
        out += piece.encode()
      first = False
    return out.decode("utf-8", errors="replace")

  def id_to_piece(self, i: int) -> str | None:
    return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

  def piece_to_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

  def save(self, directory: pathlib.Path) -> str | None:
    _write_atomic(directory / "tokenizer.model", self.proto)
    # A stale tokenizer.json would win over tokenizer.model in `from_hf_dir`.
    (directory / "tokenizer.json").unlink(missing_ok=True)
    return None


# ---------------------------------------------------------------------------------------------
# The public tokenizers.


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255, EOS 255: drives models with random weights
  (`jinfer.model.random_model`) in tests and smoke runs, where a real vocabulary adds nothing."""

  eos_ids = frozenset({255})
  vocab_size = 256

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """The bytes of `text` (there is no BOS token; add_bos is accepted and ignored)."""
    del add_bos
    return list(text.encode())

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """The text of the bytes `ids`, invalid UTF-8 replaced; EOS dropped if skip_special_tokens.

    Ids past 255 (a preset with a larger vocabulary samples them) are not bytes: each reads as
    U+FFFD, as invalid UTF-8 does.
    """
    pieces, run = [], bytearray()
    for i in ids:
      if skip_special_tokens and i in self.eos_ids:
        continue
      if 0 <= i < 256:
        run.append(i)
      else:
        pieces += [run.decode(errors="replace"), "\ufffd"]
        run = bytearray()
    return "".join(pieces) + run.decode(errors="replace")


class Tokenizer:
  """Text <-> token ids, special ids and the chat template of one model."""

  def __init__(self, backend: _HFBackend | _SentencePieceBackend, *, bos_id: int | None,
               eos_id: int | None, unk_id: int | None = None, pad_id: int | None = None,
               add_bos: bool = False, chat_template: str | None = None,
               extra_eos_ids: Iterable[int] = ()):
    self._backend = backend
    self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
    self.add_bos = add_bos
    self.chat_template = chat_template
    eos = {int(i) for i in extra_eos_ids}
    if eos_id is not None:
      eos.add(eos_id)
    self.eos_ids: frozenset[int] = frozenset(eos)
    if add_bos and bos_id is None:
      raise CheckpointError(
          "The tokenizer asks for a BOS token but names none; set bos_token "
          "(tokenizer_config.json) or tokenizer.ggml.bos_token_id (GGUF), or turn add_bos_token "
          "off.")

  def __repr__(self) -> str:
    return (f"Tokenizer({self._backend.kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})")

  # -- constructors ------------------------------------------------------------------------------

  @classmethod
  def from_gguf_reader(cls, reader: gguf.GGUFReader) -> Tokenizer:
    """The tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
    meta = _GGUFMeta(reader)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
      raise CheckpointError(
          "The GGUF file has no tokenizer (no tokenizer.ggml.model key); load the tokenizer from "
          "the model's Hugging Face directory with Tokenizer.from_hf_dir instead.")
    if model == "gpt2":
      backend, default_add_bos = _byte_level_from_gguf(meta), False
    elif model == "llama":
      # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
      backend, default_add_bos = _sentencepiece_from_gguf(meta), True
    else:
      raise CheckpointError(
          f"The GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; jinfer "
          "reads 'gpt2' (byte-level BPE) and 'llama' (sentencepiece). Load the tokenizer from the "
          "model's Hugging Face directory with Tokenizer.from_hf_dir instead.")
    ids = {name: meta.get(f"tokenizer.ggml.{key}_token_id")
           for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding"))}
    extra_eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_add_bos)
    tok = cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"],
              pad_id=ids["pad"], add_bos=bool(add_bos),
              chat_template=meta.get("tokenizer.chat_template"),
              extra_eos_ids=[i for i in extra_eos if i is not None])
    tok._check_ids()
    if isinstance(backend, _HFBackend) and tok.add_bos:
      _set_bos_post_processor(backend.tok, tok.id_to_piece(tok.bos_id), tok.bos_id)
    return tok

  @classmethod
  def from_hf_dir(cls, path: PathLike) -> Tokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json or tokenizer.model + configs."""
    directory = pathlib.Path(path)
    if (directory / "tokenizer.json").is_file():
      backend = _load_tokenizer_json(directory / "tokenizer.json")
    elif (directory / "tokenizer.model").is_file():
      backend = _load_sentencepiece(directory / "tokenizer.model")
    else:
      raise CheckpointError(
          f"No tokenizer in {str(directory)!r}: neither tokenizer.json nor tokenizer.model "
          "exists. Copy the tokenizer files from the model's repository into that directory.")
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    gen_config = _read_json(directory / "generation_config.json")
    ids = {name: _special_id(backend, name, config, special_map, gen_config, directory)
           for name in _SPECIAL_NAMES}
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # the tokenizer.json post-processor decides, as in transformers
      probe = backend.encode_with_post_processor("")
      add_bos = bool(probe) and probe[0] == ids["bos"]
    gen_eos = gen_config.get("eos_token_id")
    extra_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    tok = cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"],
              pad_id=ids["pad"], add_bos=bool(add_bos),
              chat_template=_hf_chat_template(directory, config), extra_eos_ids=extra_eos)
    tok._check_ids()
    return tok

  @classmethod
  def from_sentencepiece(cls, model_path: PathLike, *,
                         chat_template: str | None = None) -> Tokenizer:
    """A bare sentencepiece model; BOS is added by default when the model has one."""
    backend = _load_sentencepiece(pathlib.Path(model_path))
    sp = backend.sp
    ids = {name: (None if i < 0 else i) for name, i in
           zip(_SPECIAL_NAMES, (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()))}
    return cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unk"],
               pad_id=ids["pad"], add_bos=ids["bos"] is not None, chat_template=chat_template)

  def save(self, directory: PathLike) -> None:
    """Writes tokenizer.json (or tokenizer.model) and tokenizer_config.json for `from_hf_dir`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_class = self._backend.save(directory)
    config: dict[str, Any] = {"add_bos_token": self.add_bos, "add_eos_token": False}
    if tokenizer_class:
      config["tokenizer_class"] = tokenizer_class
    for name in _SPECIAL_NAMES:
      i = getattr(self, f"{name}_id")
      config[f"{name}_token"] = None if i is None else self.id_to_piece(i)
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    # chat_template.jinja overrides tokenizer_config.json when reloading; drop a stale one.
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    _write_atomic(directory / "tokenizer_config.json",
                  json.dumps(config, indent=2, ensure_ascii=False).encode())
    self._save_extra_eos(directory)

  def _save_extra_eos(self, directory: pathlib.Path) -> None:
    if self.eos_ids == {self.eos_id} or not self.eos_ids:
      return
    path = directory / "generation_config.json"
    gen_config = _read_json(path)
    first = [] if self.eos_id is None else [self.eos_id]
    gen_config["eos_token_id"] = first + sorted(self.eos_ids - {self.eos_id})
    _write_atomic(path, json.dumps(gen_config, indent=2).encode())

  def _check_ids(self) -> None:
    for name in _SPECIAL_NAMES:
      i = getattr(self, f"{name}_id")
      if i is not None and not 0 <= i < self.vocab_size:
        raise CheckpointError(
            f"The tokenizer's {name} id {i} is outside its vocabulary of {self.vocab_size}; the "
            "tokenizer metadata is corrupt. Re-export the tokenizer from the original model.")

  # -- use ---------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of token ids."""
    return self._backend.vocab_size

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops."""
    return self._backend.special_ids

  def encode(self, text: str, *, add_bos: bool | None = None,
             split_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. Special-token strings in it (e.g. '<|im_end|>') become the special
    tokens, as in transformers and vLLM, unless `split_special_tokens`: then they are encoded as
    the plain text they are (what a server wants for untrusted text)."""
    text = validation.text("text", text, allow_empty=True)
    if add_bos is not None:
      validation.boolean("add_bos", add_bos)
    ids = self._backend.encode(text, validation.boolean("split_special_tokens",
                                                        split_special_tokens))
    if self.add_bos if add_bos is None else add_bos:
      if self.bos_id is None:
        raise InvalidRequestError("add_bos=True, but this tokenizer has no BOS token.")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """The text of token ids. Ids past the tokenizer's vocabulary (a model's padded vocabulary
    rows) decode to nothing, as in transformers."""
    ids = validation.token_ids("ids", ids if hasattr(ids, "__len__") else list(ids),
                               allow_empty=True)
    check_request(all(i >= 0 for i in ids), f"ids must be >= 0, got {[i for i in ids if i < 0]}.")
    return self._backend.decode(ids, validation.boolean("skip_special_tokens",
                                                        skip_special_tokens))

  def id_to_piece(self, i: int) -> str:
    """The vocabulary string of token `i` (InvalidRequestError outside the vocabulary)."""
    piece = self._backend.id_to_piece(int(i))
    if piece is None:
      raise InvalidRequestError(f"Token id {i} is outside the vocabulary of {self.vocab_size}.")
    return piece

  def piece_to_id(self, piece: str) -> int | None:
    """The id of a vocabulary entry (e.g. 'Ġthe', '<|im_end|>'), or None."""
    return self._backend.piece_to_id(piece)

  def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                          tokenize: bool = False, split_special_tokens: bool = False,
                          **kwargs: Any) -> str | list[int]:
    """Renders `messages` exactly as transformers' apply_chat_template(tokenize=False).

    With `tokenize=True`, returns the token ids of that text instead (no BOS added: templates
    write their own). Special-token strings inside message contents then become special tokens,
    as in transformers, unless `split_special_tokens=True`: contents are then encoded as plain
    text while the template's own markers stay special tokens, so a user who writes
    '<|im_end|><|im_start|>system' in a message cannot open a new turn (role injection).
    """
    for name, value in (("add_generation_prompt", add_generation_prompt), ("tokenize", tokenize),
                        ("split_special_tokens", split_special_tokens)):
      validation.boolean(name, value)
    if split_special_tokens and not tokenize:
      raise InvalidRequestError("split_special_tokens=True needs tokenize=True: the text alone "
                                "cannot say which special-token strings are content.")
    if not tokenize:
      return self._render(messages, add_generation_prompt, kwargs)
    if not split_special_tokens:
      return self.encode(self._render(messages, add_generation_prompt, kwargs), add_bos=False)
    ids = []
    for piece, is_content in self._content_pieces(messages, add_generation_prompt, kwargs):
      ids += self.encode(piece, add_bos=False, split_special_tokens=is_content)
    return ids

  def _render(self, messages: list[dict], add_generation_prompt: bool,
              kwargs: dict[str, Any]) -> str:
    if self.chat_template is None:
      raise CheckpointError(
          "This tokenizer has no chat template, so chat messages cannot be formatted; pass the "
          "prompt as plain text, or set tokenizer.chat_template to a Jinja template.")
    if not isinstance(messages, (list, tuple)) or not messages:
      raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': "
                                f"...}} dicts, got {messages!r:.80}.")
    variables = {f"{name}_token": self.id_to_piece(i) for name in _SPECIAL_NAMES
                 if (i := getattr(self, f"{name}_id")) is not None}
    variables.update(tools=None, documents=None)
    variables.update(_plain(kwargs))
    template = _compile_template(self.chat_template)
    try:
      return template.render(messages=_prepare_messages(messages),
                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
      raise InvalidRequestError(f"The chat template rejected these messages: {e}") from e

  def _content_pieces(self, messages: list[dict], add_generation_prompt: bool,
                      kwargs: dict[str, Any]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is message content) pieces.

    The template is rendered once with a marker for each string content, which shows the
    template text around the contents, and once for real; each content is then read off the
    real text between its surrounding template pieces (templates may trim it).
    """
    text = self._render(messages, add_generation_prompt, kwargs)  # the template's checks first
    # Only string contents are encoded as plain text: special-token strings anywhere else (a
    # role, a name, a list of content parts, a template variable) would reach the template's
    # text as special tokens, so they are refused.
    self._refuse_special_strings("template variables", kwargs)
    contents, marked = [], []
    nonce = uuid.uuid4().hex  # unguessable, so no message can contain the marker
    for i, message in enumerate(messages):
      content = message.get("content")
      rest = {k: v for k, v in message.items() if k != "content" or not isinstance(v, str)}
      self._refuse_special_strings(f"messages[{i}]", rest)
      if isinstance(content, str):
        marked.append({**message, "content": f"\x00{nonce}-{len(contents)}\x00"})
        contents.append(content)
      else:
        marked.append(message)
    parts = re.split(f"\x00{nonce}-(\\d+)\x00", self._render(marked, add_generation_prompt,
                                                                  kwargs))
    template_pieces, content_ids = parts[0::2], [int(i) for i in parts[1::2]]
    pieces, pos = [], 0
    for i, template_piece in enumerate(template_pieces):
      if not text.startswith(template_piece, pos):
        raise InvalidRequestError(_TEMPLATE_CHANGES_CONTENT)
      pieces.append((template_piece, False))
      pos += len(template_piece)
      if i == len(content_ids):
        break
      content = contents[content_ids[i]]
      following = template_pieces[i + 1]
      for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
        if text.startswith(candidate + following, pos):
          pieces.append((candidate, True))
          pos += len(candidate)
          break
      else:
        raise InvalidRequestError(_TEMPLATE_CHANGES_CONTENT)
    return pieces

  def _refuse_special_strings(self, where: str, value: Any) -> None:
    """Raises if a special-token string occurs in any string inside `value`."""
    if isinstance(value, str):
      found = [p for p in self._special_pieces if p in value]
      if found:
        raise InvalidRequestError(
            f"{where} holds the special-token string {found[0]!r} outside a string 'content'; "
            "with split_special_tokens only string contents are encoded as plain text. Remove "
            "it, or pass the text as 'content'.")
    elif isinstance(value, dict):
      for key, item in value.items():
        self._refuse_special_strings(f"{where}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
      for i, item in enumerate(value):
        self._refuse_special_strings(f"{where}[{i}]", item)

  @functools.cached_property
  def _special_pieces(self) -> list[str]:
    return [p for i in self.special_ids if (p := self._backend.id_to_piece(i))]


_TEMPLATE_CHANGES_CONTENT = (
    "This chat template changes message contents beyond trimming them, so split_special_tokens "
    "cannot tell content from template; render with tokenize=False and encode yourself.")


# ---------------------------------------------------------------------------------------------
# Streaming detokenization.


class IncrementalDetokenizer:
  """Streaming detokenization that never emits half a UTF-8 character.

  Nor a character whose bytes are spread over several tokens and not all arrived yet.

  The vLLM / text-generation-inference method: decode a few tokens of context with and without
  the new ones, and emit the difference once it does not end in U+FFFD. Context matters because
  byte-level tokens can split a character and sentencepiece drops the space of a leading piece.
  With `prefix_ids` (e.g. the prompt), the output is the text the new tokens add after them.
  """

  def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False,
               prefix_ids: Sequence[int] = ()):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._ids = [int(i) for i in prefix_ids]
    self._read = len(self._ids)  # ids before this are already emitted
    self._prefix = max(self._read - _DETOKENIZE_WINDOW, 0)  # start of the decoded context

  def push(self, token_id: int) -> str:
    """Adds one token; returns only newly completed text (may be "")."""
    self._ids.append(int(token_id))
    return self._advance(final=False)

  def flush(self) -> str:
    """The rest of the text at the end of the stream (may end in U+FFFD on broken bytes)."""
    return self._advance(final=True)

  def _advance(self, final: bool) -> str:
    decode = functools.partial(self._tokenizer.decode, skip_special_tokens=self._skip)
    prefix_text = decode(self._ids[self._prefix:self._read])
    new_text = decode(self._ids[self._prefix:])
    if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
      return ""
    self._prefix, self._read = self._read, len(self._ids)
    return new_text[len(prefix_text):]


# ---------------------------------------------------------------------------------------------
# GGUF vocabularies.


class _GGUFMeta:
  """Reads `tokenizer.*` values from a GGUFReader as plain Python values."""

  def __init__(self, reader: gguf.GGUFReader):
    self._fields = reader.fields

  def get(self, key: str, default: Any = None) -> Any:
    field = self._fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise CheckpointError(
          f"The GGUF tokenizer has no {key}; the file is incomplete. Re-convert the model with "
          "llama.cpp's convert_hf_to_gguf.py, or load the tokenizer with Tokenizer.from_hf_dir.")
    return value


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map used by byte-level vocabularies."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _byte_level_from_gguf(meta: _GGUFMeta) -> _HFBackend:
  """Byte-level BPE the way llama.cpp runs a 'gpt2' vocabulary."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models
  tokens = meta.require("tokenizer.ggml.tokens")
  merges = meta.require("tokenizer.ggml.merges")
  types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
  pre = meta.get("tokenizer.ggml.pre", "default")
  alphabet = set(_byte_alphabet().values())
  spell = _byte_alphabet()
  # A few converters store tokens as raw text; re-spell those in the byte alphabet.
  vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode())): i
           for i, t in enumerate(tokens)}
  model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES_PRE)
  tok = HFTokenizer(model)
  tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
  tok.decoder = decoders.ByteLevel()
  # Control tokens are matched whole in the text, as llama.cpp and transformers do.
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, ty in zip(tokens, types)
                          if ty == _CONTROL and set(t) <= alphabet])
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
  return _HFBackend(tok)


def _gguf_pre_tokenizer(pre: str) -> Any:
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _GPT2_PRE:
    return byte_level
  if pre in _DIGITS_THEN_GPT2_PRE:  # llama.cpp: "\p{N}" first, then GPT-2's regex
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _SPLIT_PRE:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  known = sorted({*_GPT2_PRE, *_DIGITS_THEN_GPT2_PRE, *_SPLIT_PRE})
  raise CheckpointError(
      f"The GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; jinfer knows "
      f"{known}. Load the tokenizer from the model's Hugging Face directory with "
      "Tokenizer.from_hf_dir instead.")


def _set_bos_post_processor(tok: Any, bos: str, bos_id: int) -> None:
  """Makes a saved tokenizer.json add BOS by itself, like Hugging Face's own files."""
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def _sentencepiece_from_gguf(meta: _GGUFMeta) -> _SentencePieceBackend:
  """Rebuilds the sentencepiece model of a 'llama' GGUF vocabulary (pieces, scores, types)."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=g-import-not-at-top
  tokens = meta.require("tokenizer.ggml.tokens")
  scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
  proto = pb.ModelProto()
  for piece, score, ty in zip(tokens, scores, types):
    ty = ty if _NORMAL <= ty <= _BYTE else _NORMAL
    proto.pieces.add(piece=piece, score=score, type=ty)
  proto.trainer_spec.model_type = pb.TrainerSpec.BPE
  proto.trainer_spec.byte_fallback = _BYTE in types
  for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding")):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    setattr(proto.trainer_spec, f"{name}_id", -1 if i is None else i)
    if i is not None:
      setattr(proto.trainer_spec, f"{name}_piece", tokens[i])
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  proto.normalizer_spec.remove_extra_whitespaces = False
  proto.normalizer_spec.escape_whitespaces = True
  try:
    return _SentencePieceBackend(proto.SerializeToString())
  except (RuntimeError, OSError) as e:
    raise CheckpointError(
        f"The GGUF 'llama' vocabulary is not a valid sentencepiece model ({e}); load the tokenizer "
        "with Tokenizer.from_hf_dir instead.") from e


# ---------------------------------------------------------------------------------------------
# Hugging Face directories.


def _load_tokenizer_json(path: pathlib.Path) -> _HFBackend:
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
  try:
    return _HFBackend(HFTokenizer.from_file(str(path)))
  except Exception as e:  # tokenizers raises a bare Exception on malformed files
    raise CheckpointError(
        f"Cannot read {str(path)!r} ({e}); the file is corrupt or from a newer tokenizers "
        "release. Re-download it, or upgrade the `tokenizers` package.") from e


def _load_sentencepiece(path: pathlib.Path) -> _SentencePieceBackend:
  try:
    return _SentencePieceBackend(path.read_bytes())
  except (RuntimeError, OSError) as e:
    raise CheckpointError(
        f"Cannot read the sentencepiece model {str(path)!r} ({e}); re-download it.") from e


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); re-download it.") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{str(path)!r} should hold a JSON object; re-download it.")
  return value


def _token_content(value: Any) -> str | None:
  """A special token as written in configs: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _special_id(backend: Any, name: str, config: dict, special_map: dict, gen_config: dict,
                directory: pathlib.Path) -> int | None:
  key = f"{name}_token"
  content = _token_content(config.get(key)) or _token_content(special_map.get(key))
  if content is None:
    value = gen_config.get(f"{name}_token_id")
    return value[0] if isinstance(value, list) and value else value
  i = backend.piece_to_id(content)
  if i is None and name in ("bos", "eos"):
    raise CheckpointError(
        f"{key} {content!r} in {str(directory)!r} is not in the vocabulary; fix "
        "tokenizer_config.json to name a token of tokenizer.json / tokenizer.model.")
  return i


def _hf_chat_template(directory: pathlib.Path, config: dict) -> str | None:
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.is_file():
    return jinja_file.read_text(encoding="utf-8")
  template = config.get("chat_template") or _read_json(
      directory / "chat_template.json").get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default") or next(iter(named.values()), None)
  return template


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` so that `path` is never seen half-written."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


# ---------------------------------------------------------------------------------------------
# Chat templates, rendered as transformers renders them (utils/chat_template_utils.py).


class _GenerationTag(jinja2.ext.Extension):
  """Accepts `{% generation %}...{% endgeneration %}` (assistant masks); renders the body."""

  tags = {"generation"}

  def parse(self, parser: Any) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller: Any) -> str:
    return caller()


class _TemplateDict:
  """`dict(...)` for templates without exposing the dict type itself."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """Jinja's namespace, refusing underscore names that could reach Python internals."""

  def __init__(*args: Any, **kwargs: Any):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"Chat templates cannot set underscore attributes on a namespace ({name!r}).")


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  # Jinja's own tojson escapes HTML characters, which chat templates must not do.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
  # Templates come from downloaded files: render them sandboxed and immutable.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     dict=_TemplateDict(), namespace=_TemplateNamespace)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise CheckpointError(
        f"The chat template is not valid Jinja ({e}); fix or replace "
        "tokenizer.chat_template.") from e


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages: list[dict]) -> list[dict]:
  """A plain copy of the messages, normalized as transformers does before rendering."""
  out = []
  for message in messages:
    if not isinstance(message, dict):
      raise InvalidRequestError(f"Chat messages must be dicts, got {message!r}.")
    # Keys set to None (OpenAI's content=None) are dropped: templates handle a missing key.
    message = _plain({k: v for k, v in message.items() if v is not None})
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def _plain(value: Any) -> Any:
  """A copy made of JSON types only, so templates never touch caller objects."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, dict):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  for base in (bool, str, int, float):
    if isinstance(value, base):
      return base(value)
  if hasattr(value, "item"):  # numpy scalars
    return _plain(value.item())
  return f"<{type(value).__name__}>"
