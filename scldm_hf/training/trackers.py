"""Experiment trackers: accelerate's (tensorboard, wandb, mlflow, ...) and our dependency-free ``csv`` tracker.

``csv`` is ours because accelerate has no tracker that writes plain files: ``metrics.csv`` needs no extra package,
survives a resume (rows are appended) and is what the tests, benchmarks and model cards read.
"""

import csv
from pathlib import Path

from accelerate.tracking import GeneralTracker, get_available_trackers
from accelerate.utils import LoggerType

from scldm_hf.errors import ConfigurationError

METRICS_FILE = "metrics.csv"
TRACKER_NAMES = ("csv", "none", *LoggerType.list())


class CSVTracker(GeneralTracker):
    """`Accelerator(log_with=CSVTracker(logging_dir))`: appends to ``<logging_dir>/metrics.csv`` (kept on resume)."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / METRICS_FILE

    @property
    def tracker(self) -> Path:
        return self.path

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not self.path.is_file()
        with self.path.open("a", newline="") as file:
            writer = csv.writer(file)
            if is_new:
                writer.writerow(["step", "metric", "value"])
            writer.writerows([step, name, value] for name, value in values.items())


def check_tracker_names(names: list[str]) -> None:
    """Refuse names that are neither ours (csv, none) nor accelerate's `LoggerType` values."""
    unknown = sorted(set(names) - set(TRACKER_NAMES))
    if unknown:
        raise ConfigurationError(f"report_to {unknown} are not trackers; pick from {list(TRACKER_NAMES)}.")


def build_trackers(names: list[str], logging_dir: str | Path) -> list[str | GeneralTracker]:
    """`Accelerator(log_with=...)` for `report_to` `names` (``none`` adds nothing).

    accelerate silently drops a tracker whose package is missing; here that is an error naming the package.
    """
    check_tracker_names(names)
    available = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in (*available, "csv", "none", "all")]
    if missing:
        raise ConfigurationError(
            f"report_to {missing}: the tracker package is not installed; `pip install {' '.join(missing)}` or pick one "
            f"of {['csv', 'none', *sorted(available)]}."
        )
    return [CSVTracker(logging_dir) if name == "csv" else name for name in names if name != "none"]
