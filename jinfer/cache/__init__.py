"""KV caches: typed pytrees the model writes to and attends over."""

from jinfer.cache.kv_cache import KVCache
from jinfer.cache.page_allocator import NO_PAGE, PageAllocator, PageRefcountError
from jinfer.cache.page_allocator import page_table_array, pages_for
from jinfer.cache.paged_kv_cache import PagedKVCache

__all__ = ["KVCache", "NO_PAGE", "PageAllocator", "PageRefcountError", "PagedKVCache",
           "page_table_array", "pages_for"]
