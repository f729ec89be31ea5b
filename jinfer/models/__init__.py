"""The model family: config (LlamaConfig), llama (the decoder forward) and attention."""
