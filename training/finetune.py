"""Fine-tune a trained SCLDMPipeline (folder or Hub id) on new data with new labels or covariates.

    accelerate launch training/finetune.py --config training/configs/pbmc_demo.yaml \
        --pipeline_name_or_path outputs/pbmc_demo/pipeline --data new_cells.h5ad --covariates "[cell_type, condition]"

Options: the fields of scldm_hf.training.FinetuneConfig (top-level keys + the `finetune:` section of the recipe).
"""

import sys

from scldm_hf.workflows import main

if __name__ == "__main__":
    sys.exit(main("finetune"))
