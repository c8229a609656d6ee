"""Publishing a trained model folder to the Hugging Face Hub."""

from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard

from .config import TrainingConfig
from .model_card import portable_config

# Training by-products that stay local: resumable checkpoints, converted data, the latent cache, staging folders.
PUSH_IGNORE_PATTERNS = ["checkpoints/*", "corpus/*", "latent_cache/*", "vae_finetune/*", ".*"]
TRAINING_CONFIG_FILE = "training_config.yaml"


def publish_model_folder(config: TrainingConfig, card: ModelCard) -> None:
    """Write the model card (``README.md``) and ``training_config.yaml`` beside the weights; push if asked."""
    output_dir = Path(config.output_dir)
    card.save(output_dir / "README.md")
    (output_dir / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(portable_config(config), sort_keys=False))
    if config.push_to_hub:
        push_folder_to_hub(output_dir, config.hub_model_id, token=config.hub_token, private=config.hub_private)


def push_folder_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                       commit_message: str = "Upload scLDM model") -> str:
    """Create `repo_id` (if needed) and upload `folder` without its training by-products; returns the repo URL."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), ignore_patterns=list(PUSH_IGNORE_PATTERNS),
                      commit_message=commit_message)
    return str(repo_url)
