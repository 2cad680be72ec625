"""Data: any text source -> prepared token files -> training batches, one idea per module.

- `gpt.data.sources`: what text to read. `open_source(cfg)` interprets `[data] source` (a text
  file, a folder or glob of files, tabular files or a saved `datasets` folder, `hf:NAME` on the
  hub, an http(s) URL, downloaded once, `python-stdlib`) and returns a `Source` of documents,
  reading nothing yet.
- `gpt.data.prepare`: the pipeline. `prepare(cfg)` splits a source into train and validation,
  tokenizes it on worker processes and writes the result atomically, under a lock, unless the
  folder already holds data prepared from the same source and settings.
- `gpt.data.prepared`: the on-disk format, owned here alone. `PreparedData` opens and checks a
  data folder and hands out its token ids; `PreparedDataWriter` writes one; `BatchSampler` draws
  reproducible, resumable training batches from it.
"""
