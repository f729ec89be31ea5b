"""Every public module, class, function and method of jinfer and pallas_kernels has a docstring.

Public: a name without a leading underscore, defined in the module that holds it (re-exported
imports are checked where they are defined). Exempt: dunder methods (`__init__` and the ones
dataclasses generate) and members a decorator from another package adds (flax's `replace`).
Properties need a docstring too.
"""

import dataclasses
import importlib
import inspect
import pkgutil
import re

import experiments
import jinfer
import pallas_kernels

PACKAGES = (jinfer, pallas_kernels, experiments)


def _module_names() -> list[str]:
  names = [pkg.__name__ for pkg in PACKAGES]
  for pkg in PACKAGES:
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
  return names


def _is_public(name: str) -> bool:
  return not name.startswith("_")


def _has_doc(doc) -> bool:
  return isinstance(doc, str) and bool(doc.strip())


def _class_has_doc(cls) -> bool:
  doc = vars(cls).get("__doc__")
  if not _has_doc(doc):
    return False
  # dataclasses (flax's too) and namedtuples write "Name(field, ...)" when the class has none.
  generated = (dataclasses.is_dataclass(cls) or hasattr(cls, "_fields")) and re.fullmatch(
      rf"{re.escape(cls.__name__)}\(.*\)", doc.strip(), re.S)
  return not generated


def _function_of(member):
  """The function behind a class member, or None for members that need no docstring."""
  if isinstance(member, (staticmethod, classmethod)):
    return member.__func__
  if isinstance(member, property):
    return member.fget
  if hasattr(member, "func") and type(member).__name__ == "cached_property":
    return member.func
  if inspect.isfunction(member):
    return member
  return None


def _missing_in_class(cls, qualname: str, module: str) -> list[str]:
  missing = []
  for name, member in vars(cls).items():
    if not _is_public(name):
      continue
    if inspect.isclass(member):
      if member.__module__ == module:
        if not _class_has_doc(member):
          missing.append(f"{qualname}.{name}")
        missing += _missing_in_class(member, f"{qualname}.{name}", module)
      continue
    fn = _function_of(member)
    if fn is None or getattr(fn, "__module__", None) != module:
      continue  # a data attribute, or added by a decorator defined elsewhere
    doc = member.__doc__ if isinstance(member, property) else fn.__doc__
    if not _has_doc(doc):
      kind = " (property)" if isinstance(member, property) else ""
      missing.append(f"{qualname}.{name}{kind}")
  return missing


def _missing_in_module(module) -> list[str]:
  name = module.__name__
  missing = [] if _has_doc(module.__doc__) else [f"{name} (module docstring)"]
  for attr, obj in vars(module).items():
    if not _is_public(attr) or getattr(obj, "__module__", None) != name:
      continue  # private, or imported from elsewhere
    if inspect.isclass(obj):
      if not _class_has_doc(obj):
        missing.append(f"{name}.{attr} (class)")
      missing += _missing_in_class(obj, f"{name}.{attr}", name)
    elif inspect.isfunction(obj) or (callable(obj) and hasattr(obj, "__wrapped__")):
      # plain functions, and jax.jit / functools wrappers of functions defined here
      if not _has_doc(obj.__doc__):
        missing.append(f"{name}.{attr}")
  return missing


def test_the_walk_finds_the_packages_modules():
  names = _module_names()
  for expected in ("jinfer.model", "jinfer.cli.generate", "jinfer.cpu_kernels.build",
                   "pallas_kernels.paged_attention.tpu"):
    assert expected in names


def test_every_public_name_has_a_docstring():
  missing = []
  for name in _module_names():
    missing += _missing_in_module(importlib.import_module(name))
  assert not missing, (f"{len(missing)} public names have no docstring; add a short one to each:\n"
                       + "\n".join(missing))


def test_the_check_sees_what_it_should():
  """The checker itself: a bare function, property, method and dataclass are reported."""

  @dataclasses.dataclass
  class Bare:
    x: int = 0

    @property
    def size(self) -> int:
      return 1

    def run(self):
      pass

    def _private(self):
      pass

  def documented():
    """Has one."""

  module = type(inspect)("fake_module")
  for obj in (Bare, documented, Bare.run, Bare._private):
    obj.__module__ = "fake_module"
  Bare.size.fget.__module__ = "fake_module"
  module.Bare, module.documented, module.imported = Bare, documented, inspect.getdoc
  assert _missing_in_module(module) == [
      "fake_module (module docstring)", "fake_module.Bare (class)",
      "fake_module.Bare.size (property)", "fake_module.Bare.run"]
