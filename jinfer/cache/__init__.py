"""KV caches: typed pytrees the model writes to and attends over."""

from jinfer.cache.kv_cache import KVCache

__all__ = ["KVCache"]
