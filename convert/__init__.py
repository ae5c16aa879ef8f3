"""llama-convert: LLaMA checkpoints (Meta or Hugging Face layout) to llamafuse rank files."""
