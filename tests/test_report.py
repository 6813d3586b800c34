"""The reporting module: tables (CSV and JSON), figures and progress bars."""

from __future__ import annotations

import csv
import json

import matplotlib.image

from flaxlm import report


def test_tables_flatten_nested_columns_in_order_of_appearance(tmp_path):
    rows = [
        {"name": "a", "mesh": {"data": 1, "fsdp": 2}, "mfu": None},
        {"name": "b", "mesh": {"data": 2, "fsdp": 1}, "mfu": 0.5, "extra": "x"},
    ]
    json_path, csv_path = report.write_table(rows, tmp_path / "out", "t")
    assert (json_path.name, csv_path.name) == ("t.json", "t.csv")
    assert json.loads(json_path.read_text()) == rows
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == ["name", "mesh.data", "mesh.fsdp", "mfu", "extra"]
    assert [r["mesh.fsdp"] for r in table] == ["2", "1"]
    assert table[0]["mfu"] == "" and table[0]["extra"] == ""


def test_figure_saves_and_progress_runs(tmp_path, capsys):
    with report.figure(tmp_path / "f.png", figsize=(3, 2)) as ax:
        ax.plot([1, 2, 3], [3, 1, 2])
    height, width, _ = matplotlib.image.imread(tmp_path / "f.png").shape
    assert (height, width) == (160, 240)  # 3 x 2 inches at 80 dpi

    bar = report.progress(["x", "y"], desc="points", unit="point")
    for item in bar:
        report.note(bar, f"a line above the bar: {item}")
    captured = capsys.readouterr()
    assert captured.out == "" and "a line above the bar: y" in captured.err
