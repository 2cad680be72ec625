"""HF transformers interop, the only package that imports transformers (lazily, inside functions).

- `convert`: model configs and weights between `gpt.model.GPT` and HF's GPT-2, Llama and Qwen3.
- `tokenizers`: an HF folder's tokenizer as a record `gpt` carries; tokenizer files from records.
- `pretrained`: `hf:NAME_OR_PATH` read like a checkpoint (`open_model` opens either); the model
  and data settings a finetune of it takes.
- `export`: `gpt export`, a model written as an HF folder.
- `tokenizers`: tokenizer records from HF model folders, and HF tokenizer files from records.
"""
