"""The command lines, run as a user runs them: `jinfer <command>` and `python -m jinfer <command>`."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "jinfer", *args], capture_output=True, text=True,
                        timeout=timeout, env=ENV)


def _assert_clean_error(result, *words):
  """Exit status 1, a one-line message naming `words`, no traceback and no warnings."""
  assert result.returncode == 1, (result.stdout, result.stderr)
  assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), result.stderr
  for word in words:
    assert word in last, last


def test_help_lists_the_commands_and_exits_0():
  result = _run("--help")
  assert result.returncode == 0, result.stderr
  for command in ("generate", "evaluate", "benchmark"):
    assert f"\n  {command} " in result.stdout


def test_console_script_is_installed_and_runs():
  script = Path(sys.executable).parent / "jinfer"
  assert script.is_file(), "pip install -e . installs the `jinfer` console script"
  result = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=ENV,
                          timeout=120)
  assert result.returncode == 0 and "generate" in result.stdout, result.stderr


def test_command_help_lists_its_flags():
  result = _run("generate", "--help")
  assert result.returncode == 0, result.stderr
  assert "jinfer generate" in result.stdout
  for flag in ("--prompt", "--chat", "--model", "--quantize", "--seed", "--kv_cache_dtype"):
    assert flag in result.stdout


def test_unknown_command_is_refused():
  result = _run("serve-forever")
  assert result.returncode == 2
  assert "unknown command 'serve-forever'" in result.stderr and "generate" in result.stderr


def test_arguments_that_are_not_flags_are_refused():
  result = _run("generate", "hello")
  assert result.returncode != 0 and "unexpected arguments ['hello']" in result.stderr


def test_importing_every_module_keeps_the_api_and_defines_no_flags():
  """A module named like an API function (jinfer/generate.py) would replace it on import, and
  flags defined at import clash between commands and with an application's own."""
  code = """
import importlib, pkgutil
from absl import flags
import jinfer, pallas_kernels
names = [m.name for pkg in (jinfer, pallas_kernels)
         for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
  importlib.import_module(name)
assert "jinfer.cli.generate" in names and "jinfer.cli.benchmark" in names, names
assert callable(jinfer.generate) and jinfer.generate.__module__ == "jinfer.decoding.generate"
from jinfer import generate
assert generate is jinfer.generate
ours = [f for f in flags.FLAGS if f in ("model", "prompt", "batch_sizes", "text_file")]
assert not ours, ours
print(len(names))
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert int(result.stdout.split()[-1]) > 30


def test_generate_checks_the_request_before_loading_the_model():
  # An unknown model would fail too, but later: the bad request is named first.
  _assert_clean_error(_run("generate", "--model=no-such-model", "--temperature=-1"),
                      "temperature", ">= 0")
  _assert_clean_error(_run("generate", "--model=no-such-model", "--prompt="), "--prompt")


def test_generate_names_an_unknown_model():
  _assert_clean_error(_run("generate", "--model=no-such-model"), "no-such-model")


@pytest.mark.parametrize("content, words", [
    (None, ["does not exist"]),
    (b"", ["is empty"]),
    (b"  \n", ["is empty"]),
    (b"\x7fELF\x00\x01binary", ["binary"]),
    (b"caf\xe9 latin-1", ["not UTF-8"]),
])
def test_evaluate_checks_the_text_file_before_loading(tmp_path, content, words):
  path = tmp_path / "text.txt"
  if content is not None:
    path.write_bytes(content)
  # w8a8 is accepted by the flag; the file is checked before the (unknown) model loads.
  _assert_clean_error(_run("evaluate", "--model=no-such-model", "--quantize=w8a8",
                           f"--text_file={path}"), str(path), *words)


def test_benchmark_refuses_bad_settings_before_loading():
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--batch_sizes=1,x"),
                      "--batch_sizes")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--peers=vllm"), "vllm")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--quantize=int3"), "int3")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--prefill_lengths=512,0"),
                      "--prefill_lengths")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--plot_dir=/no/such/dir"),
                      "--plot_dir")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--meshes=2by2"), "--meshes")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--check=/no/such.json"),
                      "--record_baseline")
  _assert_clean_error(_run("benchmark", "--model=no-such-model", "--serving",
                           "--record_baseline=/tmp/b.json"), "decode benchmark")
  _assert_clean_error(_run("generate", "--model=no-such-model", "--mesh=data:x"), "--mesh")


@pytest.mark.slow
def test_generate_answers_with_timings(smollm2_gguf_path):
  result = _run("generate", f"--model={smollm2_gguf_path}", "--chat", "--max_tokens=16",
                "--prompt=What is the capital of France?")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "The capital of France is Paris."
  assert lines[1].startswith("compile: ") and lines[1].endswith(" s")
  assert lines[2].startswith("prefill: ") and "(37 prompt tokens)" in lines[2]
  assert lines[3].startswith("decode: ") and "tok/s" in lines[3]
  assert "Warning" not in result.stderr, result.stderr


@pytest.mark.slow
def test_generate_takes_any_integer_seed_and_a_single_token(smollm2_gguf_path):
  result = _run("generate", f"--model={smollm2_gguf_path}", "--seed=-1", "--temperature=0.7",
                "--max_tokens=1")
  assert result.returncode == 0, result.stderr
  assert "decode: n/a" in result.stdout and "nan" not in result.stdout


@pytest.mark.slow
def test_generate_quantized_with_int8_kv_cache(smollm2_gguf_path):
  result = _run("generate", f"--model={smollm2_gguf_path}", "--chat", "--max_tokens=16",
                "--quantize=int4", "--kv_cache_dtype=int8",
                "--prompt=What is the capital of France?")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == "The capital of France is Paris."


@pytest.mark.slow
def test_evaluate_prints_perplexity(smollm2_gguf_path, tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("The capital of France is Paris. The capital of Italy is Rome.")
  result = _run("evaluate", f"--model={smollm2_gguf_path}", f"--text_file={text}",
                "--quantize=w8a8")
  assert result.returncode == 0, result.stderr
  assert "Warning" not in result.stderr, result.stderr
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith("perplexity: ") and 1 < float(line.split()[-1]) < 1000
