"""Read pickles of plain Python data without running any pickled code."""

import io
import pickle
from pathlib import Path

from scldm_hf.errors import CheckpointError


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global, so only built-in containers, strings and numbers can be rebuilt."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it references {module}.{name}, and only plain dicts, strings and numbers are read")


def load_plain_pickle(path: str | Path):
    """Unpickle `path` if it holds nothing but built-in data (dict, list, str, int, float...); refuse anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the path of the size-factor pickle.")
    try:
        return _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is not a plain-data pickle ({error}); it was not loaded.") from None
