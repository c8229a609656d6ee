"""A dependency-free Accelerate tracker writing ``metrics.csv`` (one ``step,metric,value`` row per logged value)."""

import csv
from pathlib import Path

from accelerate.tracking import GeneralTracker

METRICS_FILE = "metrics.csv"


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
