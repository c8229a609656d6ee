"""Train scLDM stage 1 (the VAE); the output folder is a save_pretrained SCVAEModel.

    accelerate launch training/train_vae.py --config training/configs/pbmc_demo.yaml [--name value] [--model.NAME value]
    python training/train_vae.py --config training/configs/pbmc_demo.yaml --max_train_steps 100

Options (`--help` lists them with their defaults): the fields of scldm_hf.training.VAETrainingConfig, from the recipe's
top-level keys, then its `vae:` section, then the command line.
"""

import sys

from scldm_hf.workflows import main

if __name__ == "__main__":
    sys.exit(main("vae"))
