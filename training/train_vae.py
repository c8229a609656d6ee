"""Train scLDM stage 1 (the VAE); the output folder is a save_pretrained SCVAEModel.

    accelerate launch training/train_vae.py --config training/configs/pbmc_demo.yaml [--key value | key=value ...]
    python training/train_vae.py --config training/configs/pbmc_demo.yaml --max_train_steps 100

Options: the fields of scldm_hf.training.VAETrainingConfig (top-level keys + the `vae:` section of the recipe).
"""

import sys

from scldm_hf.workflows import main

if __name__ == "__main__":
    sys.exit(main("vae"))
