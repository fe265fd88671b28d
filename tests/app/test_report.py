"""gift.app.report: eval.json files -> the paper's table shape (Markdown, CSV, PNG)."""
import csv
import json
import os

import pytest
from PIL import Image

from gift.app.commands.report import ReportError, build_table, find_results, write_report


def result(root, method, dataset, top1, params=24_576 + 768 * 10, split="test"):
    path = os.path.join(root, method, dataset, split, "eval.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"method": method, "data": f"vtab1k:/data/vtab-1k/{dataset}", "split": split, "top1": top1,
                   "trainable_parameters": params}, f)
    return path


def test_vtab_table_groups_means_and_files(tmp_path):
    runs = str(tmp_path / "runs")
    for task, acc in (("cifar", 0.70), ("dtd", 0.60), ("eurosat", 0.90), ("kitti", 0.80)):
        result(runs, "gift", task, acc)
    result(runs, "lora", "cifar", 0.50, params=200_000)
    result(runs, "lora", "cifar", 0.99, split="val200")  # another split: ignored
    paths = write_report([runs], str(tmp_path / "report"))
    table = paths["table"]
    assert table.header() == ["Method", "Params (M)", "cifar", "dtd", "Natural mean", "eurosat", "Specialized mean",
                              "kitti", "Structured mean", "Mean"]
    rows = {r[0]: r for r in table.rows()}
    assert rows["GIFT"][2:] == pytest.approx([70, 60, 65, 90, 90, 80, 80, 75])  # mean over the 4 tasks, not groups
    assert rows["LoRA"][1] == pytest.approx(0.2) and rows["LoRA"][3] is None and rows["LoRA"][-1] == pytest.approx(50)
    md = open(paths["markdown"]).read()
    assert "| GIFT | 0.032 | 70.00 | 60.00 | 65.00 | 90.00 | 90.00 | 80.00 | 80.00 | 75.00 |" in md
    assert "missing (-): LoRA: dtd, eurosat, kitti." in md
    lines = list(csv.reader(open(paths["csv"])))
    assert lines[0] == table.header() and lines[2][:3] == ["LoRA", "0.2000", "50.0000"]
    assert Image.open(paths["chart"]).format == "PNG"


def test_fgvc_columns_in_the_papers_order(tmp_path):
    for name, acc in (("stanfordcars", 0.8), ("cub", 0.9), ("mybirds", 0.5)):
        path = os.path.join(tmp_path, name, "eval.json")
        os.makedirs(os.path.dirname(path))
        json.dump({"method": "gift", "dataset": name, "top1": acc, "split": "test"}, open(path, "w"))
    table = build_table(find_results([str(tmp_path)]))
    assert table.header() == ["Method", "Params (M)", "cub", "stanfordcars", "mybirds", "Mean"]
    assert table.rows()[0][1] is None and table.rows()[0][-1] == pytest.approx(220 / 3)


def test_without_matplotlib_the_tables_are_written_and_the_error_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    result(str(tmp_path / "runs"), "gift", "dtd", 0.5)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ReportError, match=r"pip install 'gift\[plots\]'.*--no-chart skips the chart"):
        write_report([str(tmp_path / "runs")], str(tmp_path / "report"))
    assert os.path.isfile(tmp_path / "report" / "results.md") and os.path.isfile(tmp_path / "report" / "results.csv")
    assert write_report([str(tmp_path / "runs")], str(tmp_path / "r2"), chart=False)["chart"] is None


def test_bad_input(tmp_path):
    with pytest.raises(ReportError, match="no such folder"):
        find_results([str(tmp_path / "nothing")])
    with pytest.raises(ReportError, match="no eval.json with test results"):
        find_results([str(tmp_path)])
    a = result(str(tmp_path / "a"), "gift", "dtd", 0.5)
    b = result(str(tmp_path / "b"), "gift", "dtd", 0.6)
    with pytest.raises(ReportError, match=f"two test results for gift on dtd: {a} and {b}"):
        build_table(find_results([str(tmp_path / "a"), str(tmp_path / "b")]))
    json.dump({"top1": 0.5}, open(b, "w"))
    with pytest.raises(ReportError, match="not a gift eval.json \\(no method, dataset\\)"):
        find_results([str(tmp_path / "b")])
