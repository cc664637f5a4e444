"""What a run tells the person watching it: where its output goes, times and numbers as people read them, progress
during a long evaluation, a busy machine, Ctrl-C during a sweep job's evaluation."""

import io
import logging
import os
import sys

from transfer import fmt


def test_times_and_numbers_are_written_for_people():
    assert [fmt.duration(s) for s in (1192.4, 7260.0, 42.0, 0.35)] == ["19 min 52 s", "2 h 1 min", "42 s", "0.35 s"]
    numbers = [2.2761, 124712.3, 3.754553966912877e-05, 9999.4, -0.0123, 0.0, float("inf"), 1e20]
    assert [fmt.number(v) for v in numbers] == ["2.276", "124,712", "3.755e-5", "9999", "-0.0123", "0", "inf", "1e20"]
    # counts are not metrics: left out
    assert fmt.describe_metrics({"loss": 11.73, "perplexity": 124712.3, "tokens": 4096}) == (
        "loss 11.73, perplexity 124,712"
    )


class Record(dict):
    """What _log_outcome reads of a RunRecord: its items and its folder."""

    def __init__(self, out_dir, data):
        super().__init__(data)
        self.out_dir = out_dir


def test_the_outcome_line_gives_the_time_of_training_and_the_folder(tmp_path, monkeypatch, caplog):
    from transfer.run import _log_outcome

    monkeypatch.chdir(tmp_path)
    before, after = {"loss": 2.276, "perplexity": 9.739}, {"loss": 11.73, "perplexity": 124712.3}
    record = Record(tmp_path / "outputs" / "run", {
        "status": "completed", "train": {"seconds": 1192.4},
        "eval": {"probes": ["ref_python_docs"], "baseline": {"validation": before, "ref_python_docs": before},
                 "final": {"validation": after, "ref_python_docs": after}},
    })  # fmt: skip
    with caplog.at_level(logging.INFO, logger="transfer"):
        _log_outcome(record)
    assert caplog.messages == [
        "validation loss 2.276, perplexity 9.739 -> loss 11.73, perplexity 124,712; "
        "ref_python_docs perplexity 9.739 -> 124,712 in 19 min 52 s of training",
        "completed: its record, log and curves are in outputs/run",
    ]


def test_a_run_says_where_its_output_goes_at_its_start_and_end(fast_run):
    lines = [line.split(" - ", 1)[1] for line in (fast_run / "transfer.log").read_text().splitlines() if " - " in line]
    # the folder relative to where the command ran (hydra.run.dir=run)
    assert lines[0] == "output folder: run (metrics.json, transfer.log)"
    assert lines[-1] == "completed: its record, log and curves are in run"
    assert " of training" in lines[-2] and "e+0" not in lines[-2]


def test_a_long_loop_without_a_bar_logs_its_progress(caplog):
    log = logging.getLogger("transfer.test")
    ticks = iter(range(0, 200, 10))  # each item takes 10 s: read at the start and after each
    with caplog.at_level(logging.INFO, logger="transfer.test"):
        items = list(fmt.progress_lines(range(10), 10, "baseline test", "batches", log, 30, lambda: next(ticks)))
    assert items == list(range(10))
    assert caplog.messages == [
        "baseline test: 3 of 10 batches, about 1 min 10 s left",
        "baseline test: 6 of 10 batches, about 40 s left",
        "baseline test: 9 of 10 batches, about 10 s left",
    ]


def test_an_evaluation_logs_its_progress_where_no_bar_shows(monkeypatch, caplog):
    """A sweep job's log file, or a console that is no terminal: tqdm's bar is off, so the batches are logged."""
    from transfer.data.sequences import Sequences
    from transfer.evaluation import my_batches

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # what tqdm writes to: not a terminal
    monkeypatch.setattr(fmt, "PROGRESS_EVERY_S", 0.0)
    seqs = Sequences.from_lists([[1, 2, 3]] * 9, [[1, 2, 3]] * 9)
    with caplog.at_level(logging.INFO, logger="transfer.evaluation"):
        numbers = [number for number, _ in my_batches(seqs, 2, 0, "baseline test")]
    assert numbers == [0, 1, 2, 3, 4]
    done = [m.split(", about ")[0] for m in caplog.messages]
    assert done == [f"baseline test: {n} of 5 batches" for n in (1, 2, 3, 4)]
    assert "\r" not in sys.stderr.getvalue()  # no bar drawn into a file


def test_a_busy_machine_is_warned_of_once_before_training(monkeypatch, caplog):
    from transfer.training import hardware

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(hardware, "_warned_busy", False)
    log = logging.getLogger("transfer.test")
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 0.4, 0.0, 0.0))  # the run's own start-up: not busy
    hardware.warn_if_busy(log)
    assert caplog.messages == []
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 2.0, 0.0, 0.0))
    hardware.warn_if_busy(log)
    hardware.warn_if_busy(log)  # a sweep's next job in the same process
    assert caplog.messages == [
        f"the machine is busy: a load average of {cpus + 2.0:.1f} over the last minute on the {cpus} "
        f"CPU{'' if cpus == 1 else 's'} this run may use; every speed figure of this run (tokens/s, seconds, time "
        "left) will be slower than on an idle machine"
    ]
    # the record's verdict after the fact is the same
    assert hardware.MachineLoad().summary()["contended"] is True
