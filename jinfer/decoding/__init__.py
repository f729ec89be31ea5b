"""Decoding: sampling, the jitted decode loop, generate, beam search and speculative decoding."""
