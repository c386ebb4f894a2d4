"""`crossflow report`: hand-written results files -> the expected markdown tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from crossflow.cli import main as crossflow_main
from crossflow.report import find_results, report


def write_result(
    path: Path, benchmark: str, metrics: dict, backbone: str, objective: str | None = None, root: Path | None = None, rebalance: bool = False,
    settings: dict | None = None,
) -> None:
    record = {
        "benchmark": benchmark,
        "metrics": metrics,
        "per_class": {},
        "backbone": backbone,
        "backbone_sha256": None,
        "config": {"model": {"rebalance": rebalance}, "data": {"root": str(root) if root else None}},
    }
    if objective:
        record["backbone_source"] = {"objective": objective} | ({"settings": settings} if settings else {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(record))


@pytest.fixture
def synthetic_root(tmp_path):
    root = tmp_path / "voc"
    root.mkdir()
    (root / "synth.json").write_text("{}")
    return root


def test_tables_rows_columns_and_seed_spread(tmp_path, synthetic_root):
    runs = tmp_path / "runs"
    write_result(runs / "r" / "cls", "voc07_cls", {"mAP": 0.5}, "random", root=synthetic_root)
    for seed, value in enumerate((0.60, 0.64, 0.65)):
        write_result(runs / "o" / f"cls{seed}", "voc07_cls", {"mAP": value}, "o/backbone.pt", "cross_pixel", synthetic_root)
    write_result(runs / "o" / "seg", "voc12_seg", {"mIU": 0.25}, "o/backbone.pt", "cross_pixel", synthetic_root)
    write_result(runs / "d" / "det", "voc07_det", {"mAP": 0.123}, "d/backbone.pt", "flow_classification", synthetic_root)
    probe = {f"top1_conv{i}": i / 10 for i in range(1, 6)}
    write_result(runs / "rr" / "lin", "in1k_linear", probe, "random-rescaled", root=synthetic_root)

    markdown = report(find_results([str(runs)]))
    spread = statistics.stdev([60.0, 64.0, 65.0])
    table1 = [
        "| method | supervision | VOC07 Cls. mAP | VOC07 Det. mAP | VOC12 Seg. mIU |",
        "|---|---|---|---|---|",
        "| Random | - | 50.0 | - | - |",
        "| Ours direct (flow classification) | Optical flow | - | 12.3 | - |",
        f"| Ours (cross-pixel flow similarity) | Optical flow | 63.0 ± {spread:.1f} (3) | - | 25.0 |",
    ]
    table2 = [
        "| method | supervision | conv1 | conv2 | conv3 | conv4 | conv5 |",
        "|---|---|---|---|---|---|---|",
        "| Random-rescaled (Kraehenbuehl et al.) | - | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 |",
    ]
    assert "\n".join(table1) in markdown and "\n".join(table2) in markdown
    assert "synthetic world" in markdown and "paper" not in markdown  # no published rows beside synthetic runs


def test_a_rebalanced_backbone_has_its_own_row_below_its_plain_one(tmp_path, synthetic_root):
    runs = tmp_path / "runs"
    write_result(runs / "plain", "voc07_det", {"mAP": 0.30}, "o/backbone.pt", "cross_pixel", synthetic_root)
    write_result(runs / "rebalanced", "voc07_det", {"mAP": 0.40}, "o/backbone.pt", "cross_pixel", synthetic_root, rebalance=True)
    write_result(runs / "rr", "voc07_det", {"mAP": 0.35}, "random-rescaled", root=synthetic_root, rebalance=True)  # always rebalanced
    lines = report(find_results([str(runs)])).splitlines()
    rows = [line for line in lines if line.startswith("| R") or line.startswith("| O")]
    assert rows == [
        "| Random-rescaled (Kraehenbuehl et al.) | - | - | 35.0 | - |",
        "| Ours (cross-pixel flow similarity) | Optical flow | - | 30.0 | - |",
        "| Ours (cross-pixel flow similarity) + re-balancing (Kraehenbuehl et al.) | Optical flow | - | 40.0 | - |",
    ]


def test_pretrainings_of_one_objective_with_other_settings_get_a_row_each(tmp_path, synthetic_root):
    runs = tmp_path / "runs"
    def settings(lr: float) -> dict:
        return {"model": {"lr": lr, "objective": "cross_pixel"}, "data": {"crop_size": 128}}
    for seed, (lr, value) in enumerate([(1e-3, 0.30), (1e-3, 0.32), (1e-4, 0.40)]):
        write_result(runs / f"cp{seed}", "voc07_det", {"mAP": value}, f"cp{seed}/backbone.pt", "cross_pixel", synthetic_root, settings=settings(lr))
    write_result(runs / "old", "voc07_det", {"mAP": 0.20}, "old/backbone.pt", "cross_pixel", synthetic_root)  # exported before settings were
    for seed, value in enumerate((0.10, 0.12)):  # one setting only: one row, no variant named
        write_result(runs / f"d{seed}", "voc07_det", {"mAP": value}, f"d{seed}/backbone.pt", "flow_classification", synthetic_root, settings=settings(1e-3))
    rows = [line for line in report(find_results([str(runs)])).splitlines() if line.startswith("| O")]
    spread = statistics.stdev([30.0, 32.0])
    assert rows == [
        "| Ours direct (flow classification) | Optical flow | - | 11.0 ± 1.4 (2) | - |",
        "| Ours (cross-pixel flow similarity) [model.lr=0.0001] | Optical flow | - | 40.0 | - |",
        f"| Ours (cross-pixel flow similarity) [model.lr=0.001] | Optical flow | - | 31.0 ± {spread:.1f} (2) | - |",
        "| Ours (cross-pixel flow similarity) [settings not recorded] | Optical flow | - | 20.0 | - |",
    ]


def test_real_data_runs_print_the_papers_rows(tmp_path):
    real_root = tmp_path / "VOCdevkit"
    real_root.mkdir()
    write_result(tmp_path / "runs" / "a", "voc07_cls", {"mAP": 0.6}, "x/backbone.pt", "cross_pixel", real_root)
    markdown = report(find_results([str(tmp_path / "runs")]))
    assert "| Ours (cross-pixel flow similarity) | Optical flow | 60.0 | - | - |" in markdown
    assert "| *Ours (cross-pixel flow similarity), paper* | Optical flow | *64.4* | *50.3* | *41.4* |" in markdown


def test_command_writes_the_file_and_refuses_bad_input(tmp_path, synthetic_root, capsys):
    write_result(tmp_path / "runs" / "a", "voc07_cls", {"mAP": 0.5}, "random", root=synthetic_root)
    out = tmp_path / "tables.md"
    assert crossflow_main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert out.read_text() == report(find_results([str(tmp_path / "runs")]))
    (tmp_path / "empty").mkdir()
    assert crossflow_main(["report", str(tmp_path / "empty")]) == 2
    assert "no results.json under" in capsys.readouterr().err
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "runs" / "b" / "results.json").write_text("{not json")
    assert crossflow_main(["report", str(tmp_path / "runs")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is not an eval results file" in error and "\n" not in error
