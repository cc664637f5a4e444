"""Where a run's curves and summaries go: the trackers named in `logging.loggers`, behind one seam.

The loop and the run speak to a `MetricLogger` only: scalars by step, a text, the hyper-parameters against the
results, close. Rank 0 alone logs (the others get one that does nothing), and several trackers at once are one
fan-out. TensorBoard, the default, writes its event files into the run's folder.

A new tracker (W&B, MLflow) is a class here with those four methods, its name in `LOGGERS` and in
`config.schema.Logger`, and its library as an optional extra of pyproject.toml, imported in its constructor.
"""

from pathlib import Path
from typing import Protocol

from transfer.training import distributed


class MetricLogger(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...  # {tag: value} at a training step

    def text(self, tag: str, text: str, step: int | None = None) -> None: ...  # None: of the run, not a step

    def hparams(self, params: dict, metrics: dict[str, float]) -> None: ...  # the choices against the results

    def close(self) -> None: ...


class TensorBoard:
    """Event files in the run's folder. A resumed run hides what the killed one logged after its checkpoint's step
    (purge_step); a run started again in its folder, all of the earlier one's."""

    def __init__(self, folder: Path, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=0 if resumed_step is None else resumed_step + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        self.writer.add_text(tag, text, step)

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, metrics):  # the HParams dashboard: experiment, session start and end
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


LOGGERS = {"tensorboard": TensorBoard}  # logging.loggers names -> class(run folder, step the run resumes after)


class Loggers:
    """Every logger of the run at once (none: logging off, and on every rank but 0); a context manager that closes
    them."""

    def __init__(self, loggers: list[MetricLogger] = ()):
        self.loggers = list(loggers)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.scalars(values, step)

    def text(self, tag: str, text: str, step: int | None = None) -> None:
        for logger in self.loggers:
            logger.text(tag, text, step)

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.hparams(params, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_loggers(cfg, folder: Path, resumed_step: int | None = None) -> Loggers:
    """The loggers `cfg.logging.loggers` names, writing for `folder`'s run; `resumed_step`: the step its checkpoint
    holds, when it resumes (what was logged after it is the killed run's)."""
    if not distributed.is_main():
        return Loggers()
    names = dict.fromkeys(getattr(kind, "value", kind) for kind in cfg.logging.loggers)  # an Enum of the schema
    return Loggers([LOGGERS[name](folder, resumed_step) for name in names])


def scalars_of(prefix: str, result: dict) -> dict[str, float]:
    """An evaluation's float metrics as tags `<prefix>/<metric>` (validation/loss, ref_wikitext/perplexity)."""
    return {f"{prefix}/{key}": value for key, value in result.items() if isinstance(value, float)}
