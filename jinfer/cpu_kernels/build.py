"""Builds kernels.cc into a shared library at first use and registers its XLA FFI targets.

The library is compiled for the machine it runs on (-march=native) with the system C++ compiler
against the XLA FFI headers that ship with jaxlib, and cached under
`<jinfer cache>/cpu_kernels/<key>.so`. The key hashes the source, the jaxlib version, the
compiler and the CPU's feature flags, so a changed source or a home directory shared between
different machines never loads a stale or foreign build.

Without a compiler (or if the build fails) `load()` returns False once, with a warning naming
the cause, and jinfer keeps XLA's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jaxlib

SOURCE = Path(__file__).with_name("kernels.cc")
# FFI target name -> exported handler symbol.
TARGETS = {
    "jinfer_matmul_f32": "JinferMatmulF32",
    "jinfer_matmul_bf16": "JinferMatmulBF16",
    "jinfer_matmul_int8": "JinferMatmulInt8",
    "jinfer_matmul_int4": "JinferMatmulInt4",
    "jinfer_decode_rope_attention_f32": "JinferDecodeRopeAttentionF32",
    "jinfer_decode_rope_attention_bf16": "JinferDecodeRopeAttentionBF16",
    "jinfer_paged_decode_rope_attention_f32": "JinferPagedDecodeRopeAttentionF32",
    "jinfer_paged_decode_rope_attention_bf16": "JinferPagedDecodeRopeAttentionBF16",
}
DISABLE_ENV = "JINFER_CPU_KERNELS"  # set to 0 to keep XLA's own ops

log = logging.getLogger(__name__)


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which(
      "clang++")


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def library_path(compiler: str, source: Optional[Path] = None) -> Path:
  """Where the kernels built by `compiler` from `source` (default SOURCE) for this jaxlib and
  CPU are cached."""
  source = source or SOURCE
  # Imported here: the checkpoints package imports the model, which imports these kernels.
  from jinfer.checkpoints.registry import cache_dir  # pylint: disable=g-import-not-at-top
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256("\n".join(
      [source.read_text(), jaxlib.__version__, version, _cpu_flags()]).encode()).hexdigest()[:16]
  return cache_dir() / "cpu_kernels" / f"kernels-{key}.so"


def _compile(compiler: str, source: Path, output: Path) -> None:
  output.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
    built = Path(tmp) / output.name
    command = [compiler, "-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c++17",
               "-w", f"-I{jax.ffi.include_dir()}", str(source), "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(built, output)  # atomic: concurrent first uses never load a half-written file


def compiled_library(source: Optional[Path] = None) -> Path:
  """The library built from `source` (default SOURCE; another: a variant of kernels.cc under
  test, see scripts/kernel_ab.py) for this machine, compiled now if no cached build exists."""
  source = source or SOURCE
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler found; install g++ or set CXX")
  path = library_path(compiler, source)
  if not path.exists():
    log.info("compiling jinfer CPU kernels into %s", path)
    _compile(compiler, source, path)
  return path


def register(library: Path, suffix: str = "") -> None:
  """Registers the library's handlers as XLA:CPU FFI targets named TARGETS' keys + suffix (a
  suffix lets two builds of the kernels run side by side in one process)."""
  loaded = ctypes.cdll.LoadLibrary(str(library))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(getattr(loaded, symbol)),
                                platform="cpu")


@functools.cache
def load() -> bool:
  """Builds (once per machine) and registers the kernels; False if they are unavailable."""
  if os.environ.get(DISABLE_ENV, "1") == "0":
    return False
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return False  # the build flags and the AVX-512 paths are written for x86-64 Linux
  try:
    register(compiled_library())
  except (OSError, RuntimeError, AttributeError, ValueError) as e:
    log.warning("jinfer CPU kernels disabled (%s); decode uses XLA's slower ops.", e)
    return False
  return True
