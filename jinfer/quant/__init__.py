"""Quantization: int8/int4 weights (`weights`) and the int8 KV cache's quantizer (`kv`)."""
