"""Continuous batching: `Engine` (add_request / abort / step) over a long-lived paged KV pool,
its `Scheduler`, `DataParallelEngine` (one engine per data row of a mesh), and `LLM`, the
offline API on top."""

from jinfer.engine.data_parallel import DataParallelEngine
from jinfer.engine.engine import Engine, RequestOutput
from jinfer.engine.llm import LLM

__all__ = ["Engine", "DataParallelEngine", "RequestOutput", "LLM"]
