"""The task definitions (YAML, lm-evaluation-harness's format) and their reader (`custom_dataset: !function
transfer.evaluation.tasks.load`): the benchmarks' local JSONL files, offline.

lm-evaluation-harness calls it with the task's metadata (the TaskManager's, which gives `benchmark_data`, the folder
the files are in) and its `dataset_kwargs` (`data_files`: {split: file under that folder}; MMLU's `subject`). The
folder comes at run time, not from the YAML, so that the same task files read ../shared here and another copy there.
Without `benchmark_data` it is $TRANSFER_SHARED/datasets/benchmarks (`lm_eval --metadata` can give it too).
"""

import os
from pathlib import Path


def folder(benchmark_data: str | None = None) -> Path:
    if benchmark_data:
        return Path(benchmark_data).expanduser()
    return Path(os.environ.get("TRANSFER_SHARED", "../shared")).expanduser() / "datasets" / "benchmarks"


def load(data_files: dict, benchmark_data: str | None = None, subject: str | None = None, **_):
    """{split: datasets.Dataset} of each file; only the rows of `subject` where given (MMLU's one file per split)."""
    import datasets

    where = folder(benchmark_data)
    found = datasets.load_dataset("json", data_files={split: str(where / name) for split, name in data_files.items()})
    return found if subject is None else found.filter(lambda row: row["subject"] == subject)
