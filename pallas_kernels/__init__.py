"""Pallas kernels for TPU and GPU, each with its XLA reference: paged_attention (decode),
ragged_attention (packed prefill and decode), int8_matmul (int8 and W8A8 weights)."""
