"""The paper's Tables 1 and 2 from eval results: ``crossflow report RUN_DIR... [--out FILE]``.

Reads every ``results.json`` under the given folders (written by the evals, one per run) and
lays them out as the paper does:

- Table 1: VOC07 classification mAP, VOC07 detection mAP, VOC12 segmentation mean IU (%);
- Table 2: ImageNet linear-probe top-1 (%) of conv1..conv5.

A row is a backbone: ``random``, ``random-rescaled``, a torchvision ImageNet AlexNet ("Class
Labels"), or an exported crossflow backbone, named by its pretraining objective (cross-pixel
similarity = "Ours", flow classification = "Ours direct", ``supervised`` = the AlexNet trained with
the synthetic world's class labels, :mod:`crossflow.supervised`); a backbone fine-tuned with ``rebalance: true``
has a row of its own below its plain one ("+ re-balancing"), and pretrainings of one objective whose recorded
settings differ (the backbone file's ``source.settings``: model and data hyper-parameters, seeds left out) get a
row each, labelled by the settings that differ. Several results for the same row and
column (runs with other seeds) are shown as mean ± sample standard deviation (n). Where the
runs used the real datasets (a dataset folder without the synthetic world's ``synth.json``),
the paper's published rows are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from crossflow.errors import InvalidInputError, MissingInputError
from crossflow.files import write_text_atomic

TABLE1 = (("voc07_cls", "mAP", "VOC07 Cls. mAP"), ("voc07_det", "mAP", "VOC07 Det. mAP"), ("voc12_seg", "mIU", "VOC12 Seg. mIU"))
TABLE2 = tuple(("in1k_linear", f"top1_conv{i}", f"conv{i}") for i in range(1, 6))
# Rows in the paper's order, with its label and supervision.
ROWS = {
    "supervised": ("Supervised (synthetic labels)", "Class Labels"),  # crossflow.supervised on the synthetic world: the demo's upper bound
    "class_labels": ("Class Labels (ImageNet AlexNet)", "Class Labels"),
    "random": ("Random", "-"),
    "random_rescaled": ("Random-rescaled (Kraehenbuehl et al.)", "-"),
    "flow_classification": ("Ours direct (flow classification)", "Optical flow"),
    "cross_pixel": ("Ours (cross-pixel flow similarity)", "Optical flow"),
}
# The paper's published numbers (Tables 1 and 2); None where it reports none.
# Table 1's "Random-rescaled" is its row "Kraehenbuehl et al. [41]" (data-dependent initialisation).
PAPER = {
    "class_labels": {"voc07_cls/mAP": 79.9, "voc07_det/mAP": 56.8, "voc12_seg/mIU": 48.0, "conv": (19.3, 36.3, 44.2, 48.3, 50.5)},
    "random": {"voc07_cls/mAP": 53.3, "voc07_det/mAP": 43.4, "voc12_seg/mIU": 19.8, "conv": (11.6, 17.1, 16.9, 16.3, 14.1)},
    "random_rescaled": {"voc07_cls/mAP": 56.6, "voc07_det/mAP": 45.6, "voc12_seg/mIU": 32.6, "conv": (17.5, 23.0, 24.5, 23.2, 20.6)},
    "flow_classification": {"voc07_cls/mAP": 61.4, "voc07_det/mAP": 44.0, "voc12_seg/mIU": 37.1, "conv": (14.0, 22.6, 25.3, 25.0, 23.0)},
    "cross_pixel": {"voc07_cls/mAP": 64.4, "voc07_det/mAP": 50.3, "voc12_seg/mIU": 41.4, "conv": (15.0, 24.8, 28.9, 29.4, 28.0)},
}
REBALANCED = "+rebalanced"  # the suffix of a row fine-tuned with the eval's `rebalance: true`
SYNTHETIC_MARKER = "synth.json"  # written by `crossflow synth` at the root of every synthetic dataset


@dataclass(frozen=True)
class Result:
    """One eval run: which backbone (row, and its pretraining's ``settings``, the variant that ``split_variants``
    names when a row's runs differ in them), which benchmark, its metrics (fractions), real or synthetic data."""

    row: str
    benchmark: str
    metrics: dict
    synthetic: bool | None  # None: the dataset folder is gone, so unknown
    path: Path
    settings: dict | None = None  # None: not recorded (random backbones, files exported before it was)
    variant: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.row, self.variant


def paper_value(row: str, benchmark: str, metric: str) -> float | None:
    numbers = PAPER.get(row, {})
    if benchmark == "in1k_linear":
        return numbers["conv"][int(metric[-1]) - 1] if "conv" in numbers else None
    return numbers.get(f"{benchmark}/{metric}")


def row_of(record: dict) -> str:
    """The table row of a results.json record: its backbone spec, or the backbone file's kind, with the suffix
    ``REBALANCED`` where the eval re-balanced it (``random-rescaled`` always is: no suffix)."""
    spec = str(record.get("backbone", ""))
    if spec in ("random", "random-rescaled"):
        row = spec.replace("-", "_")
    else:
        kind = (record.get("backbone_source") or {}).get("objective") or record.get("backbone_kind")
        row = kind if kind in ROWS else "class_labels" if kind == "torchvision" else spec  # an unknown file: its path
    rebalanced = (record.get("config", {}).get("model") or {}).get("rebalance") and row != "random_rescaled"
    return row + REBALANCED if rebalanced else row


def row_label(key: tuple[str, str]) -> tuple[str, str]:
    """A row's (label, supervision) in the tables; ``key`` is (row, variant)."""
    row, variant = key
    base = row.removesuffix(REBALANCED)
    label, supervision = ROWS.get(base, (f"`{base}`", "?"))
    label = f"{label} + re-balancing (Kraehenbuehl et al.)" if row.endswith(REBALANCED) else label
    return (f"{label} [{variant}]" if variant else label), supervision


def flat_settings(settings: dict | None) -> dict:
    """``{"model": {"lr": 1e-4}, ...}`` -> ``{"model.lr": "0.0001", ...}``; ``{}`` when not recorded."""
    return {f"{part}.{k}": json.dumps(v) for part, values in (settings or {}).items() for k, v in values.items()}


def split_variants(results: list[Result]) -> list[Result]:
    """Where the runs of one row come from pretrainings with different settings, name each run's variant by the
    settings that differ within the row (``model.lr=0.0001``; ``settings not recorded`` for files without them)."""
    by_row = defaultdict(list)
    for result in results:
        by_row[result.row].append(result)
    named = {}
    for row, runs in by_row.items():
        flats = [flat_settings(r.settings) for r in runs]
        if len({json.dumps(f, sort_keys=True) for f in flats}) < 2:
            continue
        recorded = [f for f in flats if f]
        differing = sorted(k for k in set().union(*recorded) if len({f.get(k) for f in recorded}) > 1)
        for run, flat in zip(runs, flats):
            named[run.path] = ", ".join(f"{k}={flat.get(k, '-')}" for k in differing) if flat else "settings not recorded"
    return [replace(r, variant=named.get(r.path, "")) for r in results]


def is_synthetic(record: dict) -> bool | None:
    root = (record.get("config", {}).get("data") or {}).get("root")
    if not root or not Path(root).is_dir():
        return None
    return (Path(root) / SYNTHETIC_MARKER).is_file()


def find_results(folders: list[str]) -> list[Result]:
    """Every results.json under ``folders``, sorted by path."""
    results = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise MissingInputError(f"{folder}: no such folder (give the run folders the evals wrote, e.g. runs/eval)")
        for path in sorted(Path(folder).rglob("results.json")):
            try:
                record = json.loads(path.read_text())
                settings = (record.get("backbone_source") or {}).get("settings")
                results.append(Result(row_of(record), record["benchmark"], record["metrics"], is_synthetic(record), path, settings))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InvalidInputError(f"{path} is not an eval results file ({error}); delete it or rerun that eval") from None
    if not results:
        raise MissingInputError(f"no results.json under {' '.join(folders)}: run the evals first (e.g. `make eval-voc-cls`)")
    return split_variants(results)


def values_of(results: list[Result], key: tuple[str, str], benchmark: str, metric: str) -> list[float]:
    """The recorded values of one table cell (one per run; runs without the metric left out)."""
    return [r.metrics[metric] for r in results if r.key == key and r.benchmark == benchmark and r.metrics.get(metric) is not None]


def cell(values: list[float]) -> str:
    """Fractions -> '%' with one decimal; several values -> 'mean ± std (n)'."""
    percent = [100 * v for v in values if not math.isnan(v)]
    if not percent:
        return "-"
    if len(percent) == 1:
        return f"{percent[0]:.1f}"
    return f"{statistics.mean(percent):.1f} ± {statistics.stdev(percent):.1f} ({len(percent)})"


def ordered_rows(results: list[Result]) -> list[tuple[str, str]]:
    """The (row, variant) keys present, in ``ROWS``' order (each re-balanced row after its plain one, variants
    sorted), then unknown rows sorted."""
    present = {r.key for r in results}
    known = [key for base in ROWS for row in (base, base + REBALANCED) for key in sorted(k for k in present if k[0] == row)]
    return known + sorted(present - set(known))


def table(results: list[Result], columns: tuple, with_paper: bool) -> str:
    """Markdown table: one line per backbone (and per paper row when ``with_paper``)."""
    header = ["method", "supervision", *(title for _, _, title in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    papered = set()  # rows whose published line is printed (after the row's first variant)
    for key in ordered_rows(results):
        label, supervision = row_label(key)
        values = [cell(values_of(results, key, bench, metric)) for bench, metric, _ in columns]
        if all(v == "-" for v in values):
            continue
        lines.append("| " + " | ".join([label, supervision, *values]) + " |")
        if with_paper and key[0] in PAPER and key[0] not in papered:
            papered.add(key[0])
            published = [paper_value(key[0], bench, metric) for bench, metric, _ in columns]
            lines.append("| " + " | ".join([f"*{row_label((key[0], ''))[0]}, paper*", supervision, *("-" if v is None else f"*{v:.1f}*" for v in published)]) + " |")
    return "\n".join(lines)


def report(results: list[Result], paper: str = "auto") -> str:
    """The two tables as markdown. ``paper``: auto (when every run used real data), yes, no."""
    real = all(r.synthetic is False for r in results)
    with_paper = paper == "yes" or (paper == "auto" and real)
    data = "real datasets" if real else "the synthetic world" if all(r.synthetic for r in results) else "mixed or unknown datasets"
    parts = [
        f"Results of {len(results)} eval runs on {data}; % (mean ± std (n) over repeated runs)."
        + (" Italic rows: the paper's published numbers." if with_paper else ""),
        "",
        "**Table 1** (VOC07 classification and detection mAP, VOC12 segmentation mean IU)",
        "",
        table(results, TABLE1, with_paper),
        "",
        "**Table 2** (ImageNet linear probes, top-1 per layer)",
        "",
        table(results, TABLE2, with_paper),
    ]
    return "\n".join(parts) + "\n"


def log_to_wandb(markdown: str, results: list[Result], out_dir: Path) -> str:
    """The tables as a W&B table in a run of job type "report" (offline unless WANDB_MODE=online); returns the run dir."""
    import wandb

    columns = ["method", "benchmark", "metric", "value", "n"]
    rows = []
    for key in ordered_rows(results):
        for bench, metric, _ in TABLE1 + TABLE2:
            values = values_of(results, key, bench, metric)
            if values:
                rows.append([row_label(key)[0], bench, metric, 100 * statistics.mean(values), len(values)])
    run = wandb.init(project="crossflow", job_type="report", dir=str(out_dir), reinit="finish_previous")
    run.log({"tables": wandb.Table(columns=columns, data=rows), "report": wandb.Html(f"<pre>{markdown}</pre>")})
    run.finish()
    return str(run.dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR", help="folders searched for the evals' results.json")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--paper", choices=("auto", "yes", "no"), default="auto", help="print the paper's rows (auto: on real data)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to a W&B run")


def run(args: argparse.Namespace) -> int:
    results = find_results(args.folders)
    markdown = report(results, args.paper)
    print(markdown, end="")
    if args.out:
        write_text_atomic(args.out, markdown)
        print(f"written: {args.out}")
    if args.wandb:
        print(f"W&B run: {log_to_wandb(markdown, results, (args.out.parent if args.out else Path('.')))}")
    return 0
