"""README.md and the command lines agree on every flag.

Every `jinfer <command> ...` and `python -m jinfer <command> ...` usage in README.md (code
blocks and inline code) is read; each `--flag`, `--flag=value` and `[--flag=a|b|c]` must be
defined for that command (`jinfer.cli.command_flags`), and every concrete value shown must be
accepted by the flag's parser and by the check the command runs on it after parsing.
Placeholders (`...`, `N`, `NAME_OR_PATH`, `HOST:PORT`) are skipped.
"""

import copy
import dataclasses
from pathlib import Path
import re
from typing import Callable, NamedTuple, Optional

import pytest

from jinfer import cli

README = Path(__file__).resolve().parent.parent / "README.md"
COMMAND = re.compile(r"(?:python3? -m )?\bjinfer (" + "|".join(cli.COMMANDS) + r")\b")
# --name, --name=value, --name="quoted value"; a usage ends at a shell separator or comment.
FLAG = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*)(?:=(\"[^\"]*\"|'[^']*'|[^\s\"'`\[\]]+))?")
END = re.compile(r"\s(?:&&|\|\||;|#)\s|\s#$")
PLACEHOLDER = re.compile(r"\.\.\.|[A-Z][A-Z0-9_]*(?::[A-Z][A-Z0-9_]*)?")


class Usage(NamedTuple):
  command: str
  text: str  # the flags part: what follows `jinfer <command>`
  where: str  # e.g. "README.md:254"


class Flag(NamedTuple):
  usage: Usage
  name: str
  value: Optional[str]  # None: the bare `--name` form


def _line_of(readme: str, offset: int) -> int:
  return readme.count("\n", 0, offset) + 1


def _usages_in(text: str, where: str) -> list[Usage]:
  """The `jinfer <command>` usages in one shell command or inline code span."""
  usages = []
  for match in COMMAND.finditer(text):
    rest = text[match.end():]
    end = END.search(rest)
    usages.append(Usage(match.group(1), rest[:end.start()] if end else rest, where))
  return usages


def readme_usages(readme: str) -> list[Usage]:
  usages = []
  prose = readme
  for block in re.finditer(r"^```[^\n]*\n(.*?)^```", readme, re.S | re.M):
    prose = prose.replace(block.group(0), "\n" * block.group(0).count("\n"), 1)
    body, start = block.group(1), _line_of(readme, block.start(1))
    lines = body.split("\n")
    i = 0
    while i < len(lines):  # join `\` continuations into one command
      first, command = i, lines[i]
      while command.endswith("\\") and i + 1 < len(lines):
        i += 1
        command = command[:-1] + " " + lines[i]
      usages += _usages_in(" ".join(command.split()), f"README.md:{start + first}")
      i += 1
  for span in re.finditer(r"`([^`]+)`", prose):  # inline code, possibly across lines
    usages += _usages_in(" ".join(span.group(1).split()),
                         f"README.md:{_line_of(prose, span.start())}")
  return usages


def readme_flags(readme: str) -> list[Flag]:
  return [Flag(usage, m.group(1), m.group(2)) for usage in readme_usages(readme)
          for m in FLAG.finditer(usage.text)]


def _concrete_values(value: str) -> list[str]:
  """The values a README value stands for: each `a|b|c` alternative, placeholders left out."""
  if value[:1] in "\"'" and value[-1:] == value[:1]:
    return [value[1:-1]]
  return [v for v in value.split("|") if not PLACEHOLDER.fullmatch(v)]


# --------------------------------------------------------- checks the commands run after parsing


def _load_model_arg(name: str) -> Callable:
  def check(value):
    from jinfer import model as model_lib
    from jinfer.quant import weights
    accepted = {"quantize": weights.MODES, "kv_cache_dtype": model_lib.KV_CACHE_DTYPES}[name]
    assert value in accepted, f"load_model accepts {name} in {accepted}, not {value!r}"
  return check


def _sampling_arg(name: str) -> Callable:
  def check(value):
    import jinfer
    jinfer.SamplingParams(**{name: value})  # what generate builds from the flags
  return check


def _mesh(value):
  from jinfer.cli import generate
  generate.parse_mesh(value)


def _bench_config(field: str, as_ints: bool = False) -> Callable:
  def check(value):
    from jinfer import benchmark
    values = tuple(int(v) for v in value) if as_ints else tuple(value)
    benchmark.check_config(dataclasses.replace(benchmark.BenchConfig(), **{field: values}))
  return check


def _peers(value):
  from jinfer import benchmark
  benchmark.check_config(benchmark.BenchConfig(), value)


def _speculative(value):
  from jinfer import benchmark
  assert all(m in benchmark.SPECULATIVE_METHODS for m in value), (
      f"--speculative takes {benchmark.SPECULATIVE_METHODS}, not {value}")


def _positive_ints(value):
  assert all(int(v) >= 1 for v in value), value


def _meshes(value):
  from jinfer.cli import benchmark
  for shape in value:
    benchmark.mesh_shape(shape)


POST_PARSE_CHECKS = {
    ("generate", "quantize"): _load_model_arg("quantize"),
    ("evaluate", "quantize"): _load_model_arg("quantize"),
    ("generate", "kv_cache_dtype"): _load_model_arg("kv_cache_dtype"),
    ("evaluate", "kv_cache_dtype"): _load_model_arg("kv_cache_dtype"),
    ("generate", "mesh"): _mesh,
    **{("generate", name): _sampling_arg(name)
       for name in ("max_tokens", "temperature", "top_k", "top_p", "seed")},
    ("benchmark", "batch_sizes"): _bench_config("batch_sizes", as_ints=True),
    ("benchmark", "dtypes"): _bench_config("dtypes"),
    ("benchmark", "quantize"): _bench_config("quantize"),
    ("benchmark", "peers"): _peers,
    ("benchmark", "speculative"): _speculative,
    ("benchmark", "beam_widths"): _positive_ints,
    ("benchmark", "prefill_lengths"): _positive_ints,
    ("benchmark", "meshes"): _meshes,
}


# ------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def command_flags():
  return {command: cli.command_flags(command) for command in cli.COMMANDS}


def _problems(flag: Flag, defined) -> list[str]:
  """What is wrong with one README flag of one usage; empty when the command agrees."""
  where = f"{flag.usage.where}: `jinfer {flag.usage.command} --{flag.name}"
  where += f"={flag.value}`" if flag.value is not None else "`"
  if flag.name not in defined:
    negated = flag.name[2:] if flag.name.startswith("no") else None
    if flag.value is None and negated in defined and defined[negated].boolean:
      return []
    return [f"{where}: jinfer {flag.usage.command} has no flag --{flag.name}"]
  definition = defined[flag.name]
  if flag.value is None:
    return [] if definition.boolean else [f"{where}: --{flag.name} needs a value"]
  problems = []
  for value in _concrete_values(flag.value):
    parsed_flag = copy.deepcopy(definition)
    try:
      parsed_flag.parse(value)
    except Exception as e:  # pylint: disable=broad-except  (absl raises several kinds)
      problems.append(f"{where}: the flag refuses {value!r}: {e}")
      continue
    check = POST_PARSE_CHECKS.get((flag.usage.command, flag.name))
    if check is not None:
      try:
        check(parsed_flag.value)
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f"{where}: the command refuses {value!r}: {e}")
  return problems


def test_readme_shows_usages_of_every_command():
  usages = readme_usages(README.read_text(encoding="utf-8"))
  assert {u.command for u in usages} == set(cli.COMMANDS), usages
  assert len(readme_flags(README.read_text(encoding="utf-8"))) > 30


def test_generate_and_evaluate_offer_what_load_model_accepts(command_flags):
  """The enums the README lists for both commands are load_model's own choices."""
  from jinfer import model as model_lib
  from jinfer.quant import weights
  for command in ("generate", "evaluate"):
    defined = command_flags[command]
    assert defined["quantize"].parser.enum_values == list(weights.MODES), command
    assert defined["kv_cache_dtype"].parser.enum_values == list(model_lib.KV_CACHE_DTYPES), command


def test_every_readme_flag_and_value_is_accepted(command_flags):
  problems = []
  for flag in readme_flags(README.read_text(encoding="utf-8")):
    problems += _problems(flag, command_flags[flag.usage.command])
  assert not problems, "README.md and the commands disagree:\n" + "\n".join(problems)


def test_the_reader_finds_flags_values_and_placeholders():
  readme = """Run `jinfer generate --prompt=... [--chat] [--max_tokens=N]
  [--quantize=int8|w8a8]` or:

```bash
XLA_FLAGS=--xla_x=2 python -m jinfer benchmark --batch_sizes=1,8 \\
    --peers=none  # --request_rate=R
echo && jinfer evaluate --text_file="my notes.txt" && ls --all
```
"""
  got = [(f.usage.command, f.name, f.value, f.usage.where) for f in readme_flags(readme)]
  assert got == [
      ("benchmark", "batch_sizes", "1,8", "README.md:5"),
      ("benchmark", "peers", "none", "README.md:5"),
      ("evaluate", "text_file", '"my notes.txt"', "README.md:7"),
      ("generate", "prompt", "...", "README.md:1"),
      ("generate", "chat", None, "README.md:1"),
      ("generate", "max_tokens", "N", "README.md:1"),
      ("generate", "quantize", "int8|w8a8", "README.md:1"),
  ]
  assert _concrete_values("int8|w8a8") == ["int8", "w8a8"]
  assert _concrete_values("...") == [] and _concrete_values("HOST:PORT") == []
  assert _concrete_values('"my notes.txt"') == ["my notes.txt"]


def test_a_disagreement_is_reported(command_flags):
  usage = Usage("evaluate", "", "README.md:1")
  defined = command_flags["evaluate"]
  (problem,) = _problems(Flag(usage, "quantize", "int8|int3"), defined)  # int8 is fine
  assert problem.startswith("README.md:1: `jinfer evaluate --quantize=int8|int3`: the flag "
                            "refuses 'int3'"), problem
  assert "has no flag --batch_sizes" in _problems(Flag(usage, "batch_sizes", "1"), defined)[0]
  assert "needs a value" in _problems(Flag(usage, "model", None), defined)[0]
  bench = Usage("benchmark", "", "README.md:1")
  assert "the command refuses 'int3'" in _problems(Flag(bench, "quantize", "int3"),
                                                    command_flags["benchmark"])[0]
  assert _problems(Flag(bench, "noprogress", None), command_flags["benchmark"]) == []
