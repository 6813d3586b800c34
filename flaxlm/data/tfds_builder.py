"""A TFDS dataset builder for a local corpus: the user's own text as a versioned TFDS dataset.

    flaxlm data build-tfds --train-files 'corpus/train/*.txt' --eval-files 'corpus/eval/*.txt' \
        --data-dir ~/tensorflow_datasets

prepares `flaxlm_text` (version VERSION; `--name` and `--version` choose others, so that
several corpora and their revisions live side by side) under the data directory, with splits
`train` and `validation`, one example per document (`{"text": ...}`: a .txt file, a .jsonl
line's text field, a TFRecord example's text feature). Train on it with

    data.corpus=tfds data.tfds_name=flaxlm_text data.tfds_data_dir=~/tensorflow_datasets

(`data.tfds_name=NAME:VERSION` for a chosen one). Reading needs no source files:
`tfds.builder(name, data_dir=...)` finds the prepared files (importing this module registers
`flaxlm_text`; other names are read from their files). Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import types
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


DEFAULT_NAME = "flaxlm_text"


def builder_class(name: str = DEFAULT_NAME, version: str = str(FlaxlmText.VERSION)) -> type:
    """FlaxlmText, or an unregistered copy of it under another dataset name and version."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(
            f"--name {name!r} is not a TFDS dataset name: use lower-case letters, digits and "
            "underscores, starting with a letter (for example my_corpus)"
        )
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise ConfigError(f"--version {version!r} is not MAJOR.MINOR.PATCH (for example 1.1.0)")
    if name == DEFAULT_NAME and version == str(FlaxlmText.VERSION):
        return FlaxlmText
    body = {
        "name": name,
        "VERSION": tfds.core.Version(version),
        "RELEASE_NOTES": {version: "Local documents (txt, jsonl, TFRecord)."},
        "__module__": __name__,
    }
    # Not registered: a second build in one process must not collide; readers find it by files.
    return types.new_class(
        "FlaxlmTextAs", (FlaxlmText,), {"skip_registration": True}, lambda ns: ns.update(body)
    )


def train_overrides(data_dir: str, name: str, version: str, with_eval: bool) -> str:
    """The overrides that train on a dataset built here (what `build-tfds` suggests next)."""
    # The default version of flaxlm_text is found by name alone; any other needs NAME:VERSION.
    default = (name, version) == (DEFAULT_NAME, str(FlaxlmText.VERSION))
    out = f"data.corpus=tfds data.tfds_name={name if default else f'{name}:{version}'} "
    out += f"data.tfds_data_dir={data_dir}"
    if not with_eval:  # no `validation` split, the default data.eval_split
        out += " data.eval_split=train (evaluates on training text; --eval-files holds some out)"
    return out


def build(
    train_files: str,
    data_dir: str | os.PathLike,
    eval_files: str | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    name: str = DEFAULT_NAME,
    version: str = str(FlaxlmText.VERSION),
) -> Path:
    """Prepares a dataset (default flaxlm_text) from local files under data_dir; returns the
    dataset directory (DATA_DIR/NAME/VERSION).

    A dataset already prepared there is never silently reused (it may hold other files): it is
    refused, or with overwrite deleted and built again.
    """
    cls = builder_class(name, version)

    def make() -> FlaxlmText:
        return cls(
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
                f"{existing} already holds a prepared {name} {version}; pass --overwrite to build "
                "it again from the files given, or choose another --version or --data-dir"
            )
        shutil.rmtree(existing)
        builder = make()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return Path(builder.data_dir)
