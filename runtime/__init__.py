"""llama-run: load llamafuse rank files onto devices and evaluate them."""
