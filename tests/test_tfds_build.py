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
