"""Hugging Face interop: dsmoe models as transformers directories (config.json, safetensors, generation
config, tokenizer files) and back. Imports transformers and safetensors only when called (`pip install
-e ".[hf]"`): hf_config maps configs and picks the architecture, hf_weights maps tensors and files,
tokenizer_files writes and recognises tokenizers; dsmoe/export.py is the command line."""
