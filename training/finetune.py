"""Fine-tune a trained SCLDMPipeline (folder or Hub id) on new data with new labels or covariates.

    accelerate launch training/finetune.py --config training/configs/pbmc_demo.yaml \
        --pipeline_name_or_path outputs/pbmc_demo/pipeline --data new_cells.h5ad --covariates cell_type condition

Options (`--help` lists them with their defaults): the fields of scldm_hf.training.FinetuneConfig, from the recipe's
top-level keys, then its `finetune:` section, then the command line.
"""

import sys

from scldm_hf.workflows import main

if __name__ == "__main__":
    sys.exit(main("finetune"))
