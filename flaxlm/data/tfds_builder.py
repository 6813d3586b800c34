"""A TFDS dataset builder for a local corpus: the user's own text as a versioned TFDS dataset.

    flaxlm data build-tfds --train-files 'corpus/train/*.txt' --eval-files 'corpus/eval/*.txt' \
        --data-dir ~/tensorflow_datasets

prepares `flaxlm_text` (version VERSION) under the data directory, with splits `train` and
`validation`, one example per document (`{"text": ...}`: a .txt file, a .jsonl line's text
field, a TFRecord example's text feature). Train on it with

    data.corpus=tfds data.tfds_name=flaxlm_text data.tfds_data_dir=~/tensorflow_datasets

Reading needs no source files: `tfds.builder("flaxlm_text", data_dir=...)` finds the prepared
files (importing this module registers the name). Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import ClassVar

import tensorflow_datasets as tfds

from flaxlm.config import ConfigError, SourceConfig
from flaxlm.data.files import file_documents, resolve_files


class FlaxlmText(tfds.core.GeneratorBasedBuilder):
    """Documents of local text files, as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Local documents (txt, jsonl, TFRecord)."}

    def __init__(
        self,
        *,
        train_files: str | None = None,
        eval_files: str | None = None,
        text_field: str = "text",
        **kwargs,
    ):
        self._train_files, self._eval_files, self._text_field = train_files, eval_files, text_field
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A local text corpus prepared by flaxlm.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        if not self._train_files:
            raise ConfigError("flaxlm_text needs train_files (a glob) to be prepared")
        splits = {"train": self._generate_examples(self._train_files, "train")}
        if self._eval_files:
            splits["validation"] = self._generate_examples(self._eval_files, "eval")
        return splits

    def _generate_examples(self, pattern: str, split: str):
        import tensorflow as tf

        src = SourceConfig(
            corpus="files", text_field=self._text_field, train_files=pattern, eval_files=pattern
        )
        files = resolve_files(src, "", split, where="flaxlm_text")
        for path in files:
            docs = file_documents(tf.data.Dataset.from_tensors(path), self._text_field)
            for i, text in enumerate(docs.as_numpy_iterator()):
                if text:
                    # Text features hold str; invalid UTF-8 is replaced rather than fatal.
                    key = f"{os.path.basename(path)}:{i}"
                    yield key, {"text": text.decode("utf-8", errors="replace")}


def build(
    train_files: str,
    data_dir: str | os.PathLike,
    eval_files: str | None = None,
    text_field: str = "text",
    overwrite: bool = False,
) -> Path:
    """Prepares flaxlm_text from local files under data_dir; returns the dataset directory.

    A dataset already prepared there is never silently reused (it may hold other files): it is
    refused, or with overwrite deleted and built again.
    """

    def make() -> FlaxlmText:
        return FlaxlmText(
            train_files=train_files,
            eval_files=eval_files,
            text_field=text_field,
            data_dir=os.path.expanduser(os.path.expandvars(os.fspath(data_dir))),
        )

    builder = make()
    existing = Path(builder.data_dir)
    if (existing / "dataset_info.json").is_file():
        if not overwrite:
            raise ConfigError(
                f"{existing} already holds a prepared flaxlm_text {FlaxlmText.VERSION}; pass "
                "--overwrite to build it again from the files given, or choose another --data-dir"
            )
        shutil.rmtree(existing)
        builder = make()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return Path(builder.data_dir)
