"""Input data: tokenizers, corpora and the tf.data pipeline that packs them into batches."""
