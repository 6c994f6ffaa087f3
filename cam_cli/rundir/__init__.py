"""The run folder OUT, owned in one place (torch-free): the names of every file
camx writes there (:mod:`~cam_cli.rundir.layout`), atomic writes
(:mod:`~cam_cli.rundir.files`), records and journals
(:mod:`~cam_cli.rundir.records`), the one reader of every record of OUT
(:func:`read_run`) and the resume plan (:mod:`~cam_cli.rundir.plan`).

Explain, evaluate, report, merge and distributed runs all go through it.
"""

from __future__ import annotations

from cam_cli.rundir.files import (
    TMP_SUFFIX,
    check_writable,
    remove_temporaries,
    stage_npy,
    temporary_name,
    write_atomic,
    write_npy,
)
from cam_cli.rundir.layout import (
    MANIFEST,
    METRICS,
    METRICS_SUMMARY,
    MPRT_STRIPS,
    REPORT,
    SHARD_PART,
    RunRecords,
    gradient_name,
    is_run_folder,
    manifest_name,
    merge_manifests,
    metrics_names,
    mprt_strip_name,
    output_names,
    part_warnings,
    read_run,
    shard_parts,
)
from cam_cli.rundir.records import (
    Journal,
    RecordKey,
    dumps_record,
    finalise_manifest,
    journal_path,
    load_manifest,
    read_records,
    record_files,
    record_key,
    record_variant,
    write_manifest,
)

__all__ = [
    "MANIFEST",
    "METRICS",
    "METRICS_SUMMARY",
    "MPRT_STRIPS",
    "REPORT",
    "SHARD_PART",
    "TMP_SUFFIX",
    "Journal",
    "RecordKey",
    "RunRecords",
    "check_writable",
    "dumps_record",
    "is_run_folder",
    "finalise_manifest",
    "gradient_name",
    "journal_path",
    "load_manifest",
    "manifest_name",
    "merge_manifests",
    "metrics_names",
    "mprt_strip_name",
    "output_names",
    "part_warnings",
    "read_records",
    "read_run",
    "record_files",
    "stage_npy",
    "record_key",
    "record_variant",
    "remove_temporaries",
    "shard_parts",
    "temporary_name",
    "write_atomic",
    "write_manifest",
    "write_npy",
]
