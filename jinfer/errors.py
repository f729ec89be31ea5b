"""Exceptions raised by jinfer. Each message names the problem and the fix."""


class JinferError(Exception):
  """Base class for every error jinfer raises on purpose."""


class CheckpointError(JinferError):
  """A checkpoint file or directory is missing, truncated or malformed."""


class UnsupportedArchitectureError(CheckpointError):
  """The checkpoint describes a model family jinfer does not implement."""


class ChecksumMismatchError(CheckpointError):
  """A downloaded file does not have the expected sha256."""


class UnknownModelError(JinferError):
  """A model name is neither a registry name, a path nor a reachable hub id."""


class InvalidRequestError(JinferError, ValueError):
  """A sampling parameter or prompt is out of range."""


class CacheFullError(JinferError):
  """The paged KV cache has fewer free pages than a request needs."""


class ConfigError(JinferError, ValueError):
  """A LlamaConfig field is out of range or inconsistent with another field."""
