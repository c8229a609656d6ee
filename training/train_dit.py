"""Train scLDM stage 2 (the latent DiT); the output folder is a save_pretrained SCLDMPipeline.

    accelerate launch training/train_dit.py --config training/configs/pbmc_demo.yaml [--key value | key=value ...]
    python training/train_dit.py --config training/configs/pbmc_demo.yaml --max_train_steps 100

Options: the fields of scldm_hf.training.DiTTrainingConfig (top-level keys + the `dit:` section of the recipe).
"""

import sys

from scldm_hf.workflows import main

if __name__ == "__main__":
    sys.exit(main("dit"))
