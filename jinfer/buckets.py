"""Shape buckets: sizes rounded up to powers of two, so that a few compiled programs serve
requests of every size (XLA compiles one program per input shape)."""


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())
