"""Converters from other checkpoint formats to Hugging Face transformers directories."""

from .llama2c import convert_llama2c, read_llama2c_tokenizer

__all__ = ["convert_llama2c", "read_llama2c_tokenizer"]
