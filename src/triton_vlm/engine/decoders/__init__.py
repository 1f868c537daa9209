"""Generic decoders over the engine's slot KV cache, reused by every family whose language model has their
architecture (:mod:`.llama`). A decoder particular to one family lives in that family's package instead."""
