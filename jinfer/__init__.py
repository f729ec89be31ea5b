"""jinfer: a JAX-first research inference framework for language models.

Public API: `load_model`, `Model`, `SamplingParams`, `generate`, `generate_stream`, `Completion`,
`beam_search`, `perplexity`, and continuous batching: `LLM`, `Engine`, `RequestOutput`.
"""

from jinfer.decoding.beam_search import BeamSearchParams, BeamSequence, beam_search
from jinfer.decoding.generate import generate, generate_stream
from jinfer.decoding.results import Completion, StreamDelta
from jinfer.decoding.sampling import SamplingParams
from jinfer.decoding.speculative import SpeculativeConfig
from jinfer.engine import LLM, Engine, RequestOutput
from jinfer.errors import (CheckpointError, ChecksumMismatchError, InvalidRequestError,
                           JinferError, UnknownModelError, UnsupportedArchitectureError)
from jinfer.evaluate import perplexity
from jinfer.model import Model, load_model

__all__ = [
    "load_model", "Model", "SamplingParams", "generate", "generate_stream", "Completion",
    "StreamDelta", "JinferError", "CheckpointError", "ChecksumMismatchError",
    "InvalidRequestError", "UnknownModelError", "UnsupportedArchitectureError",
    "beam_search", "BeamSearchParams", "BeamSequence", "SpeculativeConfig", "perplexity",
    "LLM", "Engine", "RequestOutput",
]
