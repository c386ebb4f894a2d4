"""A prepared pairs folder -> the same pairs with their flow in another format: ``crossflow convert-pairs IN --out OUT``.

OUT gets the layout ``crossflow prepare`` writes (crossflow.data.prepare): the same shards, samples, order, frames
and records; each sample's flow member decoded and encoded again in ``--flow-format`` (crossflow.flow.FLOW_FORMATS),
its meta.json's ``flow_format`` set; then each shard's members cache, ``skipped.jsonl`` and ``index.json`` as prepare
writes them. ``settings.json`` is IN's with the new flow format and format version, and ``converted_from``.

Resumable as prepare is: a shard is written under a temp name and renamed, then its record; rerunning the command
converts only the shards without a record, so a killed run never leaves a shard that looks complete, and a resumed
run writes the bytes of an uninterrupted one. kitti-png <-> i16-zstd is exact (kitti-png -> i16-zstd gives the bytes
``prepare --flow-format i16-zstd`` writes); u8-lz4 -> another format keeps u8-lz4's quantised flow.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tarfile
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from crossflow.data.pairs import read_index, shard_members, write_member_index
from crossflow.data.prepare import (
    DEFAULT_FLOW_FORMAT, FLOW_FORMAT_HELP, FORMAT, FORMAT_VERSION, Group, available_cores, finalize, flow_format_of,
    groups_of, is_done, read_json, write_json,
)
from crossflow.errors import UserInputError
from crossflow.flow import FLOW_FORMATS, FLOW_MEMBERS, decode_flow_member, encode_flow_member


class ConvertError(UserInputError):
    """A problem with IN or OUT: reported as one line, with a non-zero exit status."""


def convert_sample(sample: dict, flow_format: str) -> dict:
    """One WebDataset sample (``__key__`` and member bytes) -> the same sample with its flow in ``flow_format``."""
    key = sample["__key__"]
    flow_members = [name for name in FLOW_MEMBERS if name in sample]
    if len(flow_members) != 1 or "meta.json" not in sample:
        raise ConvertError(f"sample {key} holds {sorted(k for k in sample if not k.startswith('_'))}, not one flow member and meta.json")
    try:
        flow, valid = decode_flow_member(flow_members[0], sample[flow_members[0]])
    except ValueError as error:
        raise ConvertError(f"sample {key}: {error}") from None
    name, data = encode_flow_member(flow, valid, flow_format)
    meta = json.loads(sample["meta.json"]) | {"flow_format": flow_format}
    members = {k: v for k, v in sample.items() if not k.startswith("_") and k != flow_members[0]}
    return {"__key__": key, **members, name: data, "meta.json": json.dumps(meta, sort_keys=True).encode()}


def convert_shard(source: Path, target: Path, flow_format: str, num_samples: int) -> None:
    """Write ``source``'s ``num_samples`` samples, converted, to ``target`` (temp name, then os.replace; the temp file
    is removed on failure, also when the shard holds another number of samples: a tar cut between two samples reads
    without error), then its members cache. The tar is written as prepare writes it (mtime 0, members sorted per sample)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as stream:
            with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
                count = 0
                for count, sample in enumerate(wds.WebDataset(str(source), shardshuffle=False, empty_check=False), start=1):
                    writer.write(convert_sample(sample, flow_format))
            if count != num_samples:
                raise ConvertError(f"it holds {count} of the {num_samples} samples its record lists")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    write_member_index(target)


def convert_group(job: tuple[Path, Path, Group, str]) -> Group:
    """Convert one group's shard (if it has one), then write its record: ``job = (IN, OUT, group, flow_format)``."""
    source, out, group, flow_format = job
    record = read_json(source / group.record)
    if record is None:
        raise ConvertError(f"{source / group.record} is missing or damaged: finish IN first (rerun its prepare command)")
    shard = record["shard"]  # None: the group's videos gave no pair
    if shard and not (source / shard).is_file():
        raise ConvertError(f"{source / shard} is missing: rerun IN's prepare command (it makes missing shards again), then convert again")
    if shard:
        try:
            convert_shard(source / shard, out / shard, flow_format, record["num_samples"])
        except (ConvertError, tarfile.TarError) as error:
            reason = error if isinstance(error, ConvertError) else "cut short, or not a tar file"
            raise ConvertError(f"{source / shard} is damaged ({reason}): delete it and {source / group.record}, "
                               "rerun IN's prepare command to make it again, then convert again") from None
    write_json(out / group.record, record)
    return group


def target_plan(source: Path, flow_format: str) -> dict:
    """OUT's settings.json: IN's groups and settings, with ``flow_format`` and this format version."""
    plan = read_json(source / "settings.json")
    if plan is None or plan.get("format") != FORMAT:
        raise ConvertError(f"{source} has no crossflow prepare settings.json: convert a folder that crossflow prepare wrote")
    before = plan["settings"]
    if flow_format_of(before) == flow_format:
        raise ConvertError(f"{source} already holds {flow_format} flow: choose another --flow-format ({', '.join(FLOW_FORMATS)})")
    return {
        "format": FORMAT,
        "settings": {**before, "format_version": FORMAT_VERSION, "flow_format": flow_format},
        "groups": plan["groups"],
        "converted_from": {"flow_format": flow_format_of(before), "format_version": before.get("format_version")},
    }


def check_or_write_plan(source: Path, out: Path, plan: dict) -> None:
    """Write OUT's settings.json, or check that the one there is ``plan`` (a resumed conversion of the same pairs)."""
    old = read_json(out / "settings.json")
    if old is None:
        write_json(out / "settings.json", plan)
    elif old != plan:
        other = flow_format_of(old.get("settings", {}))
        raise ConvertError(f"{out} holds other pairs ({other} flow, or other settings than {source}'s): use a new --out, "
                           "or the same IN and --flow-format to resume")


def flow_bytes_per_sample(folder: Path, index: dict) -> float:
    """Mean size of a sample's flow member in ``folder``'s shards (from their members caches)."""
    sizes = [size for split in index["splits"].values() for shard in split["shards"]
             for members in shard_members(folder / shard["path"]).values()
             for name, (_, size) in members.items() if name in FLOW_MEMBERS]  # fmt: skip
    return sum(sizes) / max(1, len(sizes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crossflow convert-pairs`` options."""
    parser.add_argument("input", type=Path, metavar="IN", help="a folder that crossflow prepare finished (holds index.json)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT", help="output folder (not IN)")
    parser.add_argument("--flow-format", choices=list(FLOW_FORMATS), default=DEFAULT_FLOW_FORMAT, help=FLOW_FORMAT_HELP)
    parser.add_argument("--workers", type=int, metavar="N", default=available_cores(), help="processes, one shard each (default: all cores)")


def run(args: argparse.Namespace) -> int:
    """``crossflow convert-pairs``: returns the exit status (errors are :class:`ConvertError`, printed by the CLI)."""
    try:
        return _convert(args.input, args.out, args.flow_format, args.workers)
    except KeyboardInterrupt:
        print("crossflow convert-pairs: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _convert(source: Path, out: Path, flow_format: str, workers: int) -> int:
    if source.resolve() == out.resolve():
        raise ConvertError(f"IN and --out are the same folder ({source}): name a new --out (IN is left as it is)")
    if workers < 1:
        raise ConvertError("--workers must be at least 1")
    source_index = read_index(source)
    plan = target_plan(source, flow_format)
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_plan(source, out, plan)
    jobs = [(source, out, group, flow_format) for group in groups_of(plan) if not is_done(out, group)]
    with tqdm(total=len(jobs), desc=f"convert to {flow_format}", unit="shard", mininterval=1.0) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                convert_group(job)
                bar.update()
        else:  # forkserver, as prepare: workers must not inherit the parent's threads
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["crossflow.data.convert"])  # imported once, not in every worker
            with context.Pool(min(workers, len(jobs))) as pool:
                for _ in pool.imap_unordered(convert_group, jobs):
                    bar.update()
    index = finalize(out)
    print(f"{out}: {index['counts']['pairs']} pairs in {sum(len(s['shards']) for s in index['splits'].values())} shards, "
          f"flow {flow_format_of(source_index['settings'])} {flow_bytes_per_sample(source, source_index) / 1e3:.1f} kB -> "
          f"{flow_format} {flow_bytes_per_sample(out, index) / 1e3:.1f} kB a sample -> {out / 'index.json'}")
    return 0
