"""From disk to batches: tokenizers, corpus files, packing into rows, the Grain pipelines, and prepared (pre-tokenized) datasets."""
