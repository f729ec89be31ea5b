"""Shared fixtures: the real SmolLM2 file (fetched once into the jinfer cache) and tiny models;
the slow marker for every test that needs that file; an opt-in persistent JAX compilation
cache."""

import gc
import importlib.util
import os
from pathlib import Path

import jax
import pytest

import jinfer

# Opt-in: compiled XLA programs persist across test runs in the directory JINFER_TEST_JAX_CACHE
# names (most of the fast tier's time is compiling the tiny models' programs, the same on every
# run: 6m50s -> 2m24s measured). Every program is cached, however quick its compile. The key is
# the lowered program, so a code change that alters a program misses; tracing and lowering still
# run on every call, and with them the registration of the CPU kernels' FFI targets that cached
# programs call. Off by default, so that a run never depends on what other runs left behind.
JAX_CACHE_ENV = "JINFER_TEST_JAX_CACHE"
_jax_cache = os.environ.get(JAX_CACHE_ENV, "")
if _jax_cache not in ("", "0"):
  jax.config.update("jax_compilation_cache_dir", str(Path(_jax_cache).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if importlib.util.find_spec("filelock"):  # (comes with torch) JAX's bounded cache needs it
    # Least recently used entries are evicted past 2 GiB; the lock also keeps concurrent test
    # runs from reading an entry another one is still writing.
    jax.config.update("jax_compilation_cache_max_size", 2 << 30)

REAL_MODEL_FIXTURES = frozenset({"smollm2", "smollm2_gguf_path"})


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module. XLA:CPU maps about 6 memory regions
  per executable and unmaps them only when the executable is freed (measured: 300 small jits
  took a process from 433 to 2,295 maps, and jax.clear_caches() back to 524). A full suite in
  one process compiles enough programs to reach Linux's limit of 65,530 maps
  (vm.max_map_count); the next compile's mmap then fails and XLA segfaults, which is how full
  CI runs died late in test_quant and test_speculative while every test passed alone."""
  yield
  from jinfer.decoding import programs  # pylint: disable=g-import-not-at-top
  programs.COMPILED.clear()
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def interpret_for():
  """`interpret=` for a kernel variant named "<platform>..." ("gpu_split2", "tpu_bq8"): compiled
  when the tests run on that platform (a TPU VM, or a lent GPU), Pallas interpret mode elsewhere.
  So the same cases check the compiled kernels against their references wherever one compiles."""
  platform = jax.default_backend()
  return lambda kernel: not kernel.startswith(platform)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Every test that needs the real SmolLM2 file is slow, marked or not (a safety net: a new test,
  or one reaching the file through another fixture, cannot slip into the fast tier)."""
  for item in items:
    if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_gguf_path():
  from jinfer.checkpoints import registry
  return registry.fetch(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
  """The real default model in float32."""
  return jinfer.load_model(str(smollm2_gguf_path), dtype="float32")


@pytest.fixture(scope="session")
def tiny_model():
  return jinfer.model.random_model("tiny-gqa", seed=0)
