"""Training a SentencePiece tokenizer on a config's train split (`flaxlm tokenizer train`).

The corpus is read through the same sources as training (python-docs, files, TFDS, mixtures),
once, in order, up to `max_bytes` of text, and fed line by line to SentencePiece's trainer
(`byte_fallback`: any text is encodable, no unknown ids). The model gets the ids
unk=0, bos=1, eos=2, pad=3, which the pipeline uses for data.add_bos / data.add_eos.

Text is kept as written, as Llama's tokenizer does: no Unicode normalization and no collapsing
of spaces, tabs or newlines (code keeps its indentation through encode and decode), digits split
one by one. It is then the tokenizer Hugging Face's `LlamaTokenizer` reads exactly, which
`convert to-hf` relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data import files, sources
from flaxlm.data.tokenizer import SENTENCEPIECE_FILE


def corpus_lines(cfg: DataConfig, max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the train split's documents (each component's, in turn)."""
    seen = 0
    for src, _, where in sources.components(cfg):
        if src.corpus == "tfds":
            docs = sources.tfds_documents(src, src.train_split, 0, 1, None, where)
        else:
            paths = files.resolve_files(src, cfg.cache_dir, "train", where)
            import tensorflow as tf

            docs = files.file_documents(tf.data.Dataset.from_tensor_slices(paths), src.text_field)
        for raw in docs.as_numpy_iterator():
            for line in raw.decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    seen += len(line)
                    yield line
                if seen >= max_bytes:
                    return


def train_sentencepiece(
    cfg: DataConfig,
    vocab_size: int,
    output: str | os.PathLike,
    model_type: str = "bpe",
    max_bytes: int = 200_000_000,
) -> Path:
    """Trains a SentencePiece model on cfg's train split; returns the .model file's path."""
    import sentencepiece as spm

    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size < 8:
        raise ConfigError(f"--vocab-size={vocab_size} is too small (at least 8)")
    prefix = out / SENTENCEPIECE_FILE.removesuffix(".model")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=corpus_lines(cfg, max_bytes),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        # SentencePiece says why (for example a vocabulary larger than the corpus allows).
        raise ConfigError(f"training the SentencePiece model failed: {e}") from e
    return prefix.with_suffix(".model")
