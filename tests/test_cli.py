"""The command lines, run as a user runs them."""

import os
import subprocess
import sys

import pytest


def _run(*flags, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jinfer.generate", *flags], capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_generate_cli_answers_with_timings(smollm2_gguf_path):
  result = _run(f"--model={smollm2_gguf_path}", "--chat", "--max_tokens=16",
                "--prompt=What is the capital of France?")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0] == "The capital of France is Paris."
  assert lines[1].startswith("compile: ") and lines[1].endswith(" s")
  assert lines[2].startswith("prefill: ") and "(37 prompt tokens)" in lines[2]
  assert lines[3].startswith("decode: ") and "tok/s" in lines[3]


def test_generate_cli_names_an_unknown_model():
  result = _run("--model=no-such-model")
  assert result.returncode != 0
  assert "no-such-model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_generate_cli_quantized_with_int8_kv_cache(smollm2_gguf_path):
  result = _run(f"--model={smollm2_gguf_path}", "--chat", "--max_tokens=16", "--quantize=int4",
                "--kv_cache_dtype=int8", "--prompt=What is the capital of France?")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == "The capital of France is Paris."


@pytest.mark.slow
def test_evaluate_cli_prints_perplexity(smollm2_gguf_path, tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("The capital of France is Paris. The capital of Italy is Rome.")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "jinfer.evaluate", f"--model={smollm2_gguf_path}",
       f"--text_file={text}", "--quantize=int8"], capture_output=True, text=True, timeout=300,
      env=env)
  assert result.returncode == 0, result.stderr
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith("perplexity: ") and 1 < float(line.split()[-1]) < 1000
