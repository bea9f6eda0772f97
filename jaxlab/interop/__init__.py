"""Import and export of external checkpoints (Hugging Face safetensors)."""
