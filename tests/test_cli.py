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
