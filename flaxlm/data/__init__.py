"""Input data: sources, tokenizers, tokenization, packing, and the sharded tf.data pipeline."""
