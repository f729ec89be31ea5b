"""Continuous batching: `Engine` (add_request / abort / step) over a long-lived paged KV pool,
its `Scheduler`, and `LLM`, the offline API on top."""

from jinfer.engine.engine import Engine, RequestOutput
from jinfer.engine.llm import LLM

__all__ = ["Engine", "RequestOutput", "LLM"]
