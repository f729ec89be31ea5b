"""Tokenizers against transformers and sentencepiece, chat templates, streaming decode, errors."""

import copy
import json
import re

import gguf
import numpy as np
import pytest
import sentencepiece as spm

from jinfer.errors import CheckpointError, InvalidRequestError
from jinfer.tokenizers import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! It's a test; isn't it? We'll see, they'd say.",
    "def f(x):\n\tif x:\n\t\treturn x  # two spaces\n    else:\n        pass\n\n\n",
    "a    b\t\t c \r\n d   \n\n  e  ",
    "Café naïve façade Übermaß señor",
    "漢字とひらがなのテキスト。中文也可以。",
    "Emoji: 😀🤖👍🏽 family 👨‍👩‍👧",
    "مرحبا بالعالم",
    "Numbers: 1 12 123 1234567 3.14159 -42 1e10 0x1F",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>",
    "",
    " ",
    " leading and trailing spaces ",
]
LONG_TEXT = " ".join(TEXTS[:9]) * 40

# transformers' GGUF loader gives 'smollm' plain GPT-2 pre-tokenization, but llama.cpp splits
# digits first (as the Digits + ByteLevel pre-tokenizer of the StarCoder/SmolLM tokenizer.json
# does); the two differ only where >= 2 whitespace characters precede a digit.
_WHITESPACE_BEFORE_DIGIT = re.compile(r"\s{2,}\d")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another, with emoji 😀 and 漢字."}],
]


# ---------------------------------------------------------------------------------------------
# Fixtures. reader, tok, hf_tok and saved_dir come from the real SmolLM2 file: their tests are
# slow; the sentencepiece and tiny-GGUF tests below run in the fast tier.


@pytest.fixture(scope="module")
def reader(smollm2_gguf_path):
  return gguf.GGUFReader(str(smollm2_gguf_path))


@pytest.fixture(scope="module")
def tok(reader):
  return Tokenizer.from_gguf_reader(reader)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(
      str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
  directory = tmp_path_factory.mktemp("smollm2_tokenizer")
  tok.save(directory)
  return directory


SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer splits text into pieces; pieces map to ids.",
    "Sentencepiece treats the input as a raw stream, spaces included.",
    "Byte fallback turns unknown characters into bytes.",
    "Numbers like 12 and 345 appear too, as do commas, dots and colons: yes.",
]


@pytest.fixture(scope="module")
def sp_model_path(tmp_path_factory):
  """A tiny llama-like BPE sentencepiece model trained on the spot."""
  directory = tmp_path_factory.mktemp("sp")
  corpus = directory / "corpus.txt"
  corpus.write_text("\n".join(SP_CORPUS * 20), encoding="utf-8")
  prefix = directory / "tiny"
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
      byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2,
      user_defined_symbols=["<tool>"])
  return directory / "tiny.model"


@pytest.fixture(scope="module")
def sp_raw(sp_model_path):
  return spm.SentencePieceProcessor(model_file=str(sp_model_path))


@pytest.fixture(scope="module")
def sp_tok(sp_model_path):
  return Tokenizer.from_sentencepiece(sp_model_path, chat_template=CHATML)


CHATML = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant: {% endif %}")

SP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Unseen words: zebra quixotic, and digits 9876.",
    "Héllo wörld — 漢字 😀 مرحبا",
    "  two leading spaces and   three inside ",
    "tabs\tand\nnewlines\n",
    "a <tool> call",
]


# ---------------------------------------------------------------------------------------------
# GGUF byte-level BPE (SmolLM2) against transformers.


@pytest.mark.slow
def test_gguf_metadata(tok):
  assert tok.vocab_size == 49152
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 2)
  assert tok.eos_ids == frozenset({2})
  assert tok.id_to_piece(1) == "<|im_start|>" and tok.id_to_piece(2) == "<|im_end|>"
  assert tok.add_bos is False
  assert tok.chat_template.startswith("{% for message in messages %}")
  assert tok.encode("Hello")[0] != tok.bos_id
  assert tok.encode("Hello", add_bos=True) == [1] + tok.encode("Hello")


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + [LONG_TEXT], ids=range(len(TEXTS) + 1))
def test_ids_equal_transformers(tok, hf_tok, text):
  assert not _WHITESPACE_BEFORE_DIGIT.search(text), "such texts are checked separately below"
  ids = tok.encode(text)
  assert ids == hf_tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text
  assert tok.decode(ids) == hf_tok.decode(ids)
  assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_special_tokens_in_text_are_single_ids(tok):
  ids = tok.encode("a<|im_start|>b<|im_end|>")
  assert 1 in ids and 2 in ids
  assert tok.decode(ids, skip_special_tokens=True) == "ab"


@pytest.mark.slow
def test_digits_after_whitespace_follow_llama_cpp(tok, hf_tok):
  # llama.cpp's 'smollm' pre-tokenizer isolates digits before GPT-2's regex, so a run of spaces
  # before a digit stays one token; transformers' GGUF loader skips the digit split.
  pieces = lambda ids: [tok.id_to_piece(i) for i in ids]
  assert pieces(tok.encode("x   1")) == ["x", "ĠĠĠ", "1"]
  assert pieces(tok.encode("  42")) == ["ĠĠ", "4", "2"]
  assert pieces(hf_tok.encode("x   1", add_special_tokens=False)) == ["x", "ĠĠ", "Ġ", "1"]
  # Digits are always single tokens in this vocabulary (it has no digit merges).
  assert pieces(tok.encode("year 2024")) == ["year", "Ġ", "2", "0", "2", "4"]
  assert tok.decode(tok.encode("x   1\n\n  42")) == "x   1\n\n  42"


@pytest.mark.slow
def test_random_strings_match_transformers_outside_digit_rule(tok, hf_tok):
  rng = np.random.default_rng(0)
  alphabet = list(" \t\n\r aAbZ09x.,;:'\"!?()<>|é漢😀ما\u00a0") + ["<|im_end|>", "'s", "  "]
  for _ in range(300):
    text = "".join(rng.choice(alphabet, size=rng.integers(0, 16)))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if not _WHITESPACE_BEFORE_DIGIT.search(text):
      assert ids == hf_tok.encode(text, add_special_tokens=False), repr(text)


# ---------------------------------------------------------------------------------------------
# Chat templates.


@pytest.mark.slow
@pytest.mark.parametrize("chat", CHATS, ids=["no_system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tok, hf_tok, chat, add_generation_prompt):
  ours = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
  theirs = hf_tok.apply_chat_template(
      chat, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert ours == theirs
  assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
  assert tok.encode(ours) == hf_tok.encode(ours, add_special_tokens=False)


@pytest.mark.slow
def test_chat_prompt_is_37_tokens(tok):
  prompt = tok.apply_chat_template(CHATS[0])
  assert "You are a helpful AI assistant named SmolLM" in prompt
  ids = tok.encode(prompt)
  assert len(ids) == 37
  assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2


@pytest.mark.slow
def test_chat_template_features_match_transformers(tok, hf_tok):
  # Trimming, raise_exception, tojson without HTML escaping, namespaces, {% generation %},
  # None-valued keys dropped, extra variables.
  template = (
      "{%- set ns = namespace(n=0) -%}\n"
      "{% for m in messages %}\n"
      "  {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n"
      "  {% set ns.n = ns.n + 1 %}\n"
      "{{ bos_token }}{% generation %}{{ m | tojson }}{% endgeneration %}{{ eos_token }}\n"
      "{% endfor %}\n"
      "{{ ns.n }} {{ extra | default('none') }} {{ 'name' in messages[0] }}")
  ours = copy.copy(tok)
  ours.chat_template = template
  chat = [{"role": "user", "content": "<b>&'\"漢</b>", "name": None}]
  expected = hf_tok.apply_chat_template(chat, tokenize=False, chat_template=template, extra=3)
  assert ours.apply_chat_template(chat, extra=3) == expected
  assert '"<b>&\'\\"漢</b>"' in expected
  with pytest.raises(InvalidRequestError, match="no tools here"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])


# ---------------------------------------------------------------------------------------------
# tokenizer.json: save() and from_hf_dir().


@pytest.mark.slow
def test_save_and_reload_tokenizer_json(tok, saved_dir):
  assert {p.name for p in saved_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
  reloaded = Tokenizer.from_hf_dir(saved_dir)
  for name in ("vocab_size", "bos_id", "eos_id", "unk_id", "pad_id", "eos_ids", "add_bos",
               "chat_template"):
    assert getattr(reloaded, name) == getattr(tok, name), name
  for text in TEXTS + ["x   1"]:
    assert reloaded.encode(text) == tok.encode(text)
    assert reloaded.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_saved_tokenizer_json_loads_in_transformers(tok, saved_dir):
  transformers = pytest.importorskip("transformers")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved_dir / "tokenizer.json"))
  for text in TEXTS + [LONG_TEXT, "x   1  42"]:
    assert fast.encode(text, add_special_tokens=False) == tok.encode(text)
  auto = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
  assert auto.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True) == (
      tok.apply_chat_template(CHATS[1]))
  assert auto.encode("hi") == tok.encode("hi")  # no BOS added by either


@pytest.mark.slow
def test_hf_dir_reads_generation_config_and_jinja_template(tok, tmp_path):
  tok.save(tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
  reloaded = Tokenizer.from_hf_dir(tmp_path)
  assert reloaded.eos_id == 2 and reloaded.eos_ids == frozenset({0, 2})
  assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
  # save() keeps the extra end-of-turn ids and replaces the stale template file.
  reloaded.chat_template = "{{ 'x' }}"
  reloaded.save(tmp_path)
  again = Tokenizer.from_hf_dir(tmp_path)
  assert again.eos_ids == frozenset({0, 2}) and again.chat_template == "{{ 'x' }}"


@pytest.mark.slow
def test_add_bos_comes_from_the_post_processor(tok, tmp_path):
  # A tokenizer.json that adds BOS by itself (like Llama 3's) and a config that does not say.
  with_bos = Tokenizer.from_hf_dir(_with_bos_post_processor(tok, tmp_path))
  assert with_bos.add_bos is True
  assert with_bos.encode("hi") == [1] + tok.encode("hi")  # BOS once, not twice
  assert with_bos.encode("hi", add_bos=False) == tok.encode("hi")


def _with_bos_post_processor(tok, directory):
  tok.save(directory)
  data = json.loads((directory / "tokenizer.json").read_text())
  data["post_processor"] = {
      "type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
      "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                          "tokens": ["<|im_start|>"]}}}
  (directory / "tokenizer.json").write_text(json.dumps(data))
  config = json.loads((directory / "tokenizer_config.json").read_text())
  del config["add_bos_token"]
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


# ---------------------------------------------------------------------------------------------
# sentencepiece.


def test_sentencepiece_ids_equal_processor(sp_tok, sp_raw):
  assert sp_tok.vocab_size == sp_raw.get_piece_size()
  assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.unk_id) == (
      sp_raw.bos_id(), sp_raw.eos_id(), sp_raw.unk_id())
  assert sp_tok.add_bos is True
  for text in SP_TEXTS:
    ids = sp_tok.encode(text, add_bos=False)
    assert ids == sp_raw.encode(text)
    assert sp_tok.encode(text) == [sp_raw.bos_id()] + ids
    assert sp_tok.decode(ids) == sp_raw.decode(ids) == text


def test_sentencepiece_uses_byte_fallback(sp_tok, sp_raw):
  ids = sp_tok.encode("漢😀", add_bos=False)
  assert all(sp_raw.is_byte(i) for i in ids if sp_tok.id_to_piece(i) != "\u2581")
  assert len([i for i in ids if sp_raw.is_byte(i)]) == len("漢😀".encode())


def test_sentencepiece_special_tokens_in_text(sp_tok, sp_raw):
  ids = sp_tok.encode("<s>The fox</s>", add_bos=False)
  assert ids[0] == sp_raw.bos_id() and ids[-1] == sp_raw.eos_id()
  # Text after a special token gets no dummy-prefix space (as transformers does).
  assert not sp_tok.id_to_piece(ids[1]).startswith("\u2581")
  assert sp_tok.decode(ids) == "<s>The fox</s>"
  assert sp_tok.decode(ids, skip_special_tokens=True) == "The fox"
  assert sp_tok.decode(sp_tok.encode("a fox")) == "<s>a fox"


def test_sentencepiece_save_round_trip(sp_tok, tmp_path):
  sp_tok.save(tmp_path)
  assert (tmp_path / "tokenizer.model").is_file()
  reloaded = Tokenizer.from_hf_dir(tmp_path)
  for name in ("vocab_size", "bos_id", "eos_id", "unk_id", "eos_ids", "add_bos", "chat_template"):
    assert getattr(reloaded, name) == getattr(sp_tok, name), name
  for text in SP_TEXTS:
    assert reloaded.encode(text) == sp_tok.encode(text)
  chat = [{"role": "user", "content": "hi"}]
  assert reloaded.apply_chat_template(chat) == "<s>user: hi</s>\n<s>assistant: "


def test_gguf_llama_vocab_equals_sentencepiece(sp_raw, tmp_path):
  path = tmp_path / "spm.gguf"
  n = sp_raw.get_piece_size()
  types = [6 if sp_raw.is_byte(i) else 3 if sp_raw.is_control(i) else 2 if sp_raw.is_unknown(i)
           else 4 if sp_raw.id_to_piece(i) == "<tool>" else 1 for i in range(n)]
  _write_gguf(path, "llama", tokens=[sp_raw.id_to_piece(i) for i in range(n)],
              scores=[sp_raw.get_score(i) for i in range(n)], token_types=types,
              bos=sp_raw.bos_id(), eos=sp_raw.eos_id(), unk=sp_raw.unk_id())
  tok = Tokenizer.from_gguf_reader(gguf.GGUFReader(str(path)))
  assert tok.add_bos is True and tok.bos_id == sp_raw.bos_id()
  for text in SP_TEXTS:
    assert tok.encode(text, add_bos=False) == sp_raw.encode(text), text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


# ---------------------------------------------------------------------------------------------
# Streaming detokenization.

STREAM_TEXTS = [
    "Emoji 😀🤖👍🏽 and family 👨‍👩‍👧 end",
    "漢字とひらがな。中文。",
    "mixed: café 😀 مرحبا 123",
]


def _stream(tok, ids, **kwargs):
  detok = IncrementalDetokenizer(tok, **kwargs)
  pieces = [detok.push(i) for i in ids]
  return pieces, detok.flush()


@pytest.mark.slow
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer_never_splits_characters(tok, text):
  ids = tok.encode(text)
  assert len(ids) > len(text.split()), "needs characters spread over several tokens"
  pieces, rest = _stream(tok, ids)
  assert "" in pieces, "some token must end mid-character"
  assert not any("\ufffd" in p for p in pieces)
  assert "".join(pieces) + rest == tok.decode(ids) == text


@pytest.mark.slow
def test_incremental_detokenizer_skips_special_tokens(tok):
  ids = tok.encode(tok.apply_chat_template(CHATS[1], add_generation_prompt=False))
  for skip in (False, True):
    pieces, rest = _stream(tok, ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)
  assert "<|im_start|>" not in "".join(_stream(tok, ids, skip_special_tokens=True)[0])


@pytest.mark.slow
def test_incremental_detokenizer_after_a_prompt(tok, sp_tok):
  for t, prompt, answer in ((tok, "Say hi:", " hi 😀 there"), (sp_tok, "The fox", " jumps over")):
    prompt_ids = t.encode(prompt)
    ids = t.encode(prompt + answer)[len(prompt_ids):]
    assert t.encode(prompt + answer)[:len(prompt_ids)] == prompt_ids
    pieces, rest = _stream(t, ids, prefix_ids=prompt_ids)
    assert "".join(pieces) + rest == answer


def test_incremental_detokenizer_sentencepiece(sp_tok):
  for text in SP_TEXTS:
    ids = sp_tok.encode(text)
    pieces, rest = _stream(sp_tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + rest == sp_tok.decode(ids)


@pytest.mark.slow
def test_flush_emits_a_broken_tail(tok):
  ids = tok.encode("😀")
  pieces, rest = _stream(tok, ids[:-1])
  assert pieces == [""] * len(pieces) and rest == tok.decode(ids[:-1]) and "\ufffd" in rest


# ---------------------------------------------------------------------------------------------
# Errors.


def _write_gguf(path, model, *, tokens, pre=None, merges=None, scores=None, token_types=None,
                bos=None, eos=None, unk=None, add_bos=None):
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model(model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  if merges is not None:
    writer.add_token_merges(merges)
  if scores is not None:
    writer.add_token_scores(scores)
  if token_types is not None:
    writer.add_token_types(token_types)
  for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id),
                     (unk, writer.add_unk_token_id)):
    if value is not None:
      add(value)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_unknown_gguf_tokenizer_model(tmp_path):
  path = tmp_path / "bert.gguf"
  _write_gguf(path, "bert", tokens=["[PAD]", "[UNK]", "a"])
  with pytest.raises(CheckpointError, match="'bert'.*from_hf_dir"):
    Tokenizer.from_gguf_reader(gguf.GGUFReader(str(path)))


def test_unknown_gguf_pre_tokenizer(tmp_path):
  path = tmp_path / "pre.gguf"
  _write_gguf(path, "gpt2", pre="made-up-pre", tokens=["a", "b", "ab"], merges=["a b"])
  with pytest.raises(CheckpointError, match="'made-up-pre'.*smollm"):
    Tokenizer.from_gguf_reader(gguf.GGUFReader(str(path)))


def test_gguf_without_merges(tmp_path):
  path = tmp_path / "no_merges.gguf"
  _write_gguf(path, "gpt2", pre="smollm", tokens=["a", "b", "ab"])
  with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
    Tokenizer.from_gguf_reader(gguf.GGUFReader(str(path)))


def test_tiny_gguf_byte_level_vocab(tmp_path):
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, "gpt2", pre="default", tokens=["<eos>", "a", "b", "ab", "Ġ", "Ġab"],
              merges=["a b", "Ġ ab"], token_types=[3, 1, 1, 1, 1, 1], bos=0, eos=0, add_bos=True)
  tiny = Tokenizer.from_gguf_reader(gguf.GGUFReader(str(path)))
  assert tiny.encode("ab ab<eos>") == [0, 3, 5, 0]
  assert tiny.encode("ab ab", add_bos=False) == [3, 5]
  assert tiny.decode([0, 3, 5, 0], skip_special_tokens=True) == "ab ab"
  # The saved tokenizer.json adds BOS by itself, like Hugging Face's own files.
  tiny.save(tmp_path / "saved")
  transformers = pytest.importorskip("transformers")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "saved/tokenizer.json"))
  assert fast.encode("ab ab") == [0, 3, 5]
  assert Tokenizer.from_hf_dir(tmp_path / "saved").encode("ab") == [0, 3]


def test_empty_dir_names_the_missing_files(tmp_path):
  with pytest.raises(CheckpointError, match="tokenizer.json.*tokenizer.model"):
    Tokenizer.from_hf_dir(tmp_path)


def test_missing_chat_template(sp_model_path):
  bare = Tokenizer.from_sentencepiece(sp_model_path)
  with pytest.raises(CheckpointError, match="no chat template"):
    bare.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_bad_special_token_in_config(tok, tmp_path):
  tok.save(tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["eos_token"] = "<|not-a-token|>"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="not-a-token.*not in the vocabulary"):
    Tokenizer.from_hf_dir(tmp_path)


def test_byte_tokenizer_reads_ids_past_255_as_replacement_characters():
  """A random preset with a real vocabulary (random_model("smollm2-135m")) samples ids past the
  bytes; decoding them must not fail (it did: bytes must be in range(0, 256))."""
  from jinfer.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top
  tok = ByteTokenizer()
  ids = tok.encode("héllo") + [4096, 255] + tok.encode("!")
  assert tok.decode(ids) == "héllo\ufffd\ufffd!"
  assert tok.decode(ids, skip_special_tokens=True) == "héllo\ufffd!"
  assert tok.decode([49151]) == "\ufffd"
