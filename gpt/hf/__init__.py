"""HF transformers interop, the only package that imports transformers (lazily, inside functions).

- `convert`: model configs and weights between `gpt.model.GPT` and HF's GPT-2 and Llama.
- `tokenizers`: tokenizer records from HF model folders, and HF tokenizer files from records.
"""
