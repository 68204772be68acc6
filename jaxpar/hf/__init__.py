"""Hugging Face model directories: config.json, generation_config.json, tokenizer.json, *.safetensors."""
