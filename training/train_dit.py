"""Train scLDM stage 2 (the latent DiT); the output folder is a save_pretrained SCLDMPipeline.

    accelerate launch training/train_dit.py --config training/configs/pbmc_demo.yaml [--name value] [--model.NAME value]
    python training/train_dit.py --config training/configs/pbmc_demo.yaml --max_train_steps 100

Options (`--help` lists them with their defaults): the fields of scldm_hf.training.DiTTrainingConfig, from the recipe's
top-level keys, then its `dit:` section, then the command line.
"""

import sys

from scldm_hf.workflows import main

if __name__ == "__main__":
    sys.exit(main("dit"))
