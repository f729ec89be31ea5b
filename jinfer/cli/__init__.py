"""`jinfer <command> [--flags]`: the command lines, thin absl programs over the library.

Each command lives in its own module with `define_flags()` and `main(argv)`; its flags are
defined only when that command runs, so importing any jinfer module defines no flags (an
application's own `--model` never clashes with ours).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import os
import sys
from typing import Optional, Sequence

# command -> what it does (the module jinfer.cli.<command> runs it)
COMMANDS = {
    "generate": "complete a prompt and print the text, compile/prefill time and decode tok/s",
    "evaluate": "print the perplexity of a model on a text file (default: jinfer/data's text)",
    "benchmark": "measure decode throughput of jinfer and its peers in one run",
}


def usage() -> str:
  """The text `jinfer --help` prints: the usage line and every command."""
  width = max(map(len, COMMANDS))
  lines = ["usage: jinfer <command> [--flag=value ...]   (or: python -m jinfer <command> ...)",
           "", "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
  lines += ["", "`jinfer <command> --help` lists a command's flags."]
  return "\n".join(lines)


def bound_flags(flag_values) -> types.SimpleNamespace:
  """absl's DEFINE_* functions defining into `flag_values`: each command's
  `define_flags(flag_values)` calls them as `flags.DEFINE_*`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(**{
      name: functools.partial(getattr(flags, name), flag_values=flag_values)
      for name in dir(flags) if name.startswith("DEFINE_")})


def command_flags(command: str):
  """A fresh absl `FlagValues` holding `command`'s flags and the multi-host ones, as `jinfer
  <command>` defines them, without running it (for tools and tests that check flag names and
  values)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if command not in COMMANDS:
    raise ValueError(f"unknown command {command!r}; use one of {list(COMMANDS)}.")
  fresh = flags.FlagValues()
  importlib.import_module(f"jinfer.cli.{command}").define_flags(fresh)
  _define_distributed_flags(fresh)
  return fresh


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs `argv[1]` with the flags after it; returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "-?", "help"):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  command = argv[1]
  if command not in COMMANDS:
    print(f"error: unknown command {command!r}; use one of {list(COMMANDS)}.\n\n{usage()}",
          file=sys.stderr)
    return 2
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"jinfer.cli.{command}")
  module.define_flags()
  _define_distributed_flags()
  # absl's --help prints the __main__ module's docstring and the flags keyed to sys.argv[0]:
  # make those the command's.
  sys.modules["__main__"].__doc__ = module.__doc__
  for name in (module.__name__, __name__):  # the command's flags and the multi-host ones
    for flag in flags.FLAGS.get_flags_for_module(name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  try:
    app.run(_reporting_errors(module.main), argv=[f"jinfer {command}", *argv[2:]])
  except SystemExit as e:
    # absl exits 1 after printing --help; asking for help is not a failure.
    asked_help = any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[2:])
    if asked_help and e.code == 1:
      return 0
    raise
  return 0


def _define_distributed_flags(flag_values=None) -> None:
  """Every command can run as one process of a multi-host run (jinfer.distributed)."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  flags = bound_flags(absl_flags.FLAGS if flag_values is None else flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-host: process 0's host:port (not needed on TPU VMs).")
  flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, from 0.")


def _reporting_errors(command_main):
  """Joins a multi-host run first when asked (then only process 0 prints). A bad model, file or
  request ends the command with its message (it names the fix), not a traceback; arguments
  that are not flags are refused."""
  def run(argv):
    from absl import app, flags  # pylint: disable=g-import-not-at-top
    from jinfer import distributed  # pylint: disable=g-import-not-at-top
    from jinfer.errors import JinferError  # pylint: disable=g-import-not-at-top
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag=value.")
    try:
      f = flags.FLAGS
      distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
      with _quiet_unless_main(distributed.is_main_process()):
        command_main(argv)
    except JinferError as e:
      sys.exit(f"error: {e}")
  return run


@contextlib.contextmanager
def _quiet_unless_main(is_main: bool):
  """Processes other than 0 run the same program but print nothing."""
  if is_main:
    yield
    return
  with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.redirect_stdout(devnull):
    yield
