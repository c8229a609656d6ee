"""Runs that span layers, above both `scldm_hf.training` and `scldm_hf.evaluation`.

- `run_stage` / `main`: a training stage whose model cards are scored under the evaluation protocol
  (train -> evaluate -> card -> push); the top-level ``training/`` scripts and ``scldm train`` call them.
- `side_by_side`: scLDM and its peers trained on one split and evaluated against the same held-out cells.
"""

import sys

from scldm_hf.errors import SCLDMError
from scldm_hf.evaluation import ProtocolCardMetrics
from scldm_hf.training import run_training_script


def run_stage(stage: str, argv: list[str], prog: str | None = None) -> str:
    """`run_training_script` of `stage` (``vae``, ``dit``, ``finetune``) with the protocol's card metrics; `prog`
    names the command in ``--help``."""
    return run_training_script(stage, argv, prog=prog, card_metrics=ProtocolCardMetrics())


def main(stage: str, argv: list[str] | None = None) -> int:
    """Entry point of ``training/train_<stage>.py``: errors of the package are printed as one line, exit code 2."""
    try:
        print(run_stage(stage, sys.argv[1:] if argv is None else argv, prog=f"training/train_{stage}.py"))
    except SCLDMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "run_stage"]
