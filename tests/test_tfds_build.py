"""`flaxlm data build-tfds` never silently reuses a dataset prepared from other files."""

from __future__ import annotations

import pytest

from flaxlm.config import ConfigError


def test_a_second_build_is_refused_unless_overwrite_which_rebuilds(tmp_path):
    from flaxlm.data.tfds_builder import FlaxlmText, build

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "0.txt").write_text("first document")
    build(f"{tmp_path}/t/*.txt", tmp_path / "data")
    (tmp_path / "t" / "1.txt").write_text("a document added later")
    with pytest.raises(ConfigError, match=r"already holds a prepared flaxlm_text .* --overwrite"):
        build(f"{tmp_path}/t/*.txt", tmp_path / "data")
    build(f"{tmp_path}/t/*.txt", tmp_path / "data", overwrite=True)
    info = FlaxlmText(data_dir=str(tmp_path / "data")).info
    assert info.splits["train"].num_examples == 2


def test_name_and_version_keep_corpora_and_revisions_side_by_side(tmp_path):
    from flaxlm.config import SourceConfig
    from flaxlm.data.sources import tfds_documents
    from flaxlm.data.tfds_builder import build

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.txt").write_text("revision one")
    data = tmp_path / "data"
    first = build(f"{tmp_path}/a/*.txt", data, name="my_corpus", version="1.0.0")
    (tmp_path / "a" / "1.txt").write_text("added in revision two")
    second = build(f"{tmp_path}/a/*.txt", data, name="my_corpus", version="1.1.0")
    default = build(f"{tmp_path}/a/0.txt", data)  # flaxlm_text 1.0.0 beside them
    assert (first.parent, second.parent) == (data / "my_corpus", data / "my_corpus")
    assert (first.name, second.name, default.parent.name) == ("1.0.0", "1.1.0", "flaxlm_text")

    def texts(name: str) -> list[bytes]:
        src = SourceConfig(corpus="tfds", tfds_name=name, tfds_data_dir=str(data))
        ds = tfds_documents(src, "train", 0, 1, seed=0, where="data")
        return sorted(ds.as_numpy_iterator())

    # Read in a fresh lookup, by name and version, from the prepared files alone.
    assert texts("my_corpus:1.0.0") == [b"revision one"]
    assert texts("my_corpus:1.1.0") == [b"added in revision two", b"revision one"]
    assert texts("flaxlm_text") == [b"revision one"]
    with pytest.raises(ConfigError, match="--name 'My-Corpus' is not a TFDS dataset name"):
        build(f"{tmp_path}/a/*.txt", data, name="My-Corpus")
    with pytest.raises(ConfigError, match=r"--version '2' is not MAJOR\.MINOR\.PATCH"):
        build(f"{tmp_path}/a/*.txt", data, version="2")
