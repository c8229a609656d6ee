"""Training infrastructure: configs, checkpoints, exact resume after crashes, multi-process CPU training.

Exactness: on CPU with one thread every kernel here is deterministic, and every random source is restored on resume
(weights, AdamW moments, LR scheduler, EMA, torch/numpy/python RNG states, the data order — a function of seed and
epoch — and the position in the epoch), so resumed runs are compared with uninterrupted ones bit for bit (atol=0).
"""

import dataclasses
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from accelerate.tracking import get_available_trackers
from safetensors.torch import load_file
from transformers import PreTrainedConfig

from scldm_hf.data import anndata_to_corpus
from scldm_hf.errors import CheckpointError, ConfigurationError, InputDataError, SCLDMError
from scldm_hf.models import SCVAEConfig
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.training import (
    DiTModelOptions,
    DiTTrainingConfig,
    RecipeParser,
    VAEModelOptions,
    VAETrainingConfig,
    load_config,
)
from scldm_hf.training.checkpointing import WRITE_DELAY_ENV, list_checkpoints
from scldm_hf.training.dit import train_dit
from scldm_hf.training.loop import build_accelerator
from scldm_hf.training.vae import train_vae

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"
NUM_CELLS = 200


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pbmc_counts):
    """A corpus of the first 200 PBMC cells (765 genes, covariate cell_type)."""
    path = tmp_path_factory.mktemp("corpus") / "pbmc200"
    anndata_to_corpus(pbmc_counts[:NUM_CELLS].copy(), path, covariates=["cell_type"])
    return path


def tiny_config(config_class, section: str, **overrides):
    return load_config(config_class, TINY, overrides, section=section)


@pytest.fixture(scope="module")
def trained_vae(corpus, tmp_path_factory):
    """The tiny VAE trained 12 steps without interruption (checkpoints every 4 steps)."""
    output_dir = tmp_path_factory.mktemp("vae") / "vae"
    train_vae(tiny_config(VAETrainingConfig, "vae", data=str(corpus), output_dir=str(output_dir)))
    return output_dir


def test_command_line_overrides_the_recipe_with_typed_nested_options():
    config = RecipeParser(VAETrainingConfig, "vae").parse(
        ["--config", str(TINY), "--learning-rate", "2e-4", "--model.hidden_size", "32", "--push_to_hub",
         "--covariates", "cell_type", "condition", "--hub_model_id=me/model", "--output_dir", "out"]
    )
    assert config.learning_rate == 2e-4 and isinstance(config.learning_rate, float)
    assert config.model.hidden_size == 32 and config.model.latent_dim == 8  # YAML section kept, one key overridden
    assert config.covariates == ["cell_type", "condition"]
    assert config.batch_size == 10 and config.push_to_hub and config.hub_model_id == "me/model"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_sise": 8}, "unknown option 'batch_sise' .*did you mean 'batch_size'"),
        ({"model": {"hiden_size": 64}}, "unknown option 'model.hiden_size' .*did you mean 'model.hidden_size'"),
        ({"batch_size": 0}, "batch_size=0 must be > 0"),
        ({"batch_size": "many"}, "--batch_size/--batch-size: invalid int value: 'many' \\(see `scldm train vae --help`\\)"),
        ({"lr_warmup_steps": 100}, "lr_warmup_steps=100"),
        ({"push_to_hub": True}, "hub_model_id"),
        ({"mixed_precision": "fp32"}, "mixed_precision='fp32' is not one of"),
        ({"report_to": "slack"}, r"report_to \['slack'\] are not trackers"),
        ({"num_threads": 0}, "num_threads=0 must be > 0"),
        ({"init_from": "vae_dir"}, r"init_from='vae_dir' fixes the architecture; remove the model options \["),
    ],
)
def test_invalid_config_values_are_rejected(overrides, message):
    with pytest.raises(ConfigurationError, match=message):
        tiny_config(VAETrainingConfig, "vae", **overrides)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model.hiden_size", "64"], r"unknown option --model.hiden_size; did you mean --model.hidden_size\?"),
        (["--model.dispersion", "genes"], r"--model.dispersion: invalid choice: 'genes'"),
        (["model.hidden_size=32"], r"unexpected argument\(s\) \['model.hidden_size=32'\]: options are written --name"),
    ],
)
def test_bad_command_line_options_are_rejected(argv, message):
    with pytest.raises(ConfigurationError, match=message):
        RecipeParser(VAETrainingConfig, "vae").parse(["--config", str(TINY), *argv])


def test_typo_in_recipe_model_section_names_the_closest_option(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: pbmc68k\noutput_dir: out\nvae:\n  model:\n    hiden_size: 64\n")
    with pytest.raises(ConfigurationError, match=r"unknown option 'model.hiden_size' .*recipe.yaml, section 'vae'.*"
                                                 r"did you mean 'model.hidden_size'"):
        load_config(VAETrainingConfig, recipe, section="vae")
    with pytest.raises(ConfigurationError, match=r"unknown option 'hiden_size' for VAEModelOptions; did you mean"):
        VAETrainingConfig(output_dir="out", data="pbmc68k", model={"hiden_size": 64})


def test_model_options_follow_the_model_signatures():
    """Every option of SCVAEConfig / LatentDiTTransformer not set from the data is a training option, with its help."""
    vae_options = {spec.name for spec in dataclasses.fields(VAEModelOptions)}
    vae_fields = {spec.name for spec in dataclasses.fields(SCVAEConfig)} - set(PreTrainedConfig.__dataclass_fields__)
    assert vae_options == vae_fields - {"gene_names", "latents_mean", "latents_std"}
    dit_parameters = set(inspect.signature(LatentDiTTransformer).parameters)
    assert {spec.name for spec in dataclasses.fields(DiTModelOptions)} == dit_parameters - {
        "num_latent_tokens", "latent_dim", "covariate_num_labels"}
    assert all(spec.metadata["help"] for spec in dataclasses.fields(VAEModelOptions))
    assert VAEModelOptions().hidden_size == SCVAEConfig().hidden_size


def test_num_threads_option_sets_torch_threads(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build_accelerator(tiny_config(VAETrainingConfig, "vae", output_dir=str(tmp_path), num_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_report_to_passes_accelerate_trackers_through(tmp_path):
    """Our csv tracker and accelerate's tensorboard log the same run; a tracker whose package is missing is an error
    (accelerate would drop it silently)."""
    config = tiny_config(VAETrainingConfig, "vae", output_dir=str(tmp_path), report_to=["csv", "tensorboard"])
    accelerator = build_accelerator(config)
    accelerator.init_trackers("run")
    accelerator.log({"loss": 0.5}, step=1)
    accelerator.end_training()
    assert (tmp_path / "logs" / "metrics.csv").read_text().splitlines() == ["step,metric,value", "1,loss,0.5"]
    assert list((tmp_path / "logs" / "run").glob("events.out.tfevents.*"))
    if "wandb" not in {str(tracker) for tracker in get_available_trackers()}:
        with pytest.raises(ConfigurationError, match=r"report_to \['wandb'\]: the tracker package is not installed"):
            build_accelerator(tiny_config(VAETrainingConfig, "vae", output_dir=str(tmp_path), report_to="wandb"))


@pytest.mark.parametrize("data", ["missing.h5ad", "garbage.h5ad"])
def test_run_failing_on_its_data_leaves_no_output_folder(tmp_path, data):
    """The folders a run created are removed when it fails before training; a folder that existed is kept."""
    (tmp_path / "garbage.h5ad").write_text("not an AnnData")
    new_dir = tmp_path / "runs" / "vae"
    with pytest.raises(InputDataError if data == "garbage.h5ad" else ConfigurationError, match="h5ad"):
        train_vae(tiny_config(VAETrainingConfig, "vae", data=str(tmp_path / data), output_dir=str(new_dir)))
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    with pytest.raises(SCLDMError):
        train_vae(tiny_config(VAETrainingConfig, "vae", data=str(tmp_path / data), output_dir=str(existing)))
    assert [path.name for path in existing.iterdir()] == ["notes.txt"]


def test_missing_required_option_is_named():
    with pytest.raises(ConfigurationError, match=r"required: --output_dir/--output-dir, --data"):
        load_config(VAETrainingConfig, overrides={})


def test_vae_run_saves_model_checkpoints_and_metrics(trained_vae):
    assert [path.name for path in list_checkpoints(trained_vae / "checkpoints")] == ["checkpoint-8", "checkpoint-12"]
    final = load_file(trained_vae / "model.safetensors")
    checkpoint = load_file(trained_vae / "checkpoints" / "checkpoint-12" / "model.safetensors")
    assert all(torch.equal(final[name], checkpoint[name]) for name in final)
    logged = (trained_vae / "logs" / "metrics.csv").read_text().splitlines()
    assert logged[0] == "step,metric,value"
    assert {row.split(",")[0] for row in logged[1:]} == {"2", "4", "6", "8", "10", "12"}
    assert any(row.startswith("12,final/validation_loss,") for row in logged)  # no card metrics without workflows


def test_crash_then_resume_matches_uninterrupted_dit_run(trained_vae, corpus, tmp_path, monkeypatch):
    """DiT with EMA, gradient accumulation and random noise: 11 micro-batches per epoch, 12 steps span 2 epochs; the
    crash lands in epoch 1 and the resume starts from checkpoint-4 in the middle of epoch 0."""
    import scldm_hf.training.dit as dit

    settings = {"data": str(corpus), "vae_name_or_path": str(trained_vae), "batch_size": 16,
                "gradient_accumulation_steps": 2}
    reference = train_dit(tiny_config(DiTTrainingConfig, "dit", output_dir=str(tmp_path / "reference"), **settings))

    class SimulatedCrash(Exception):
        pass

    original_loss, calls = dit.flow_matching_loss, []

    def crash_at_batch_15(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15:  # epoch 1, before optimizer step 8 (steps end at micro-batches 2, 4, .., 10, 11)
            raise SimulatedCrash
        return original_loss(*args, **kwargs)

    crashed_dir = tmp_path / "crashed"
    config = tiny_config(DiTTrainingConfig, "dit", output_dir=str(crashed_dir), **settings)
    with monkeypatch.context() as patch:
        patch.setattr(dit, "flow_matching_loss", crash_at_batch_15)
        with pytest.raises(SimulatedCrash):
            train_dit(config)
    assert [path.name for path in list_checkpoints(crashed_dir / "checkpoints")] == ["checkpoint-4"]
    cache_file = next((crashed_dir / "latent_cache").glob("*.arrow"))
    cache_mtime = cache_file.stat().st_mtime_ns

    config.resume_from_checkpoint = "latest"
    resumed = train_dit(config)
    assert cache_file.stat().st_mtime_ns == cache_mtime, "the latent cache was re-encoded instead of reused"
    expected, actual = reference.transformer.state_dict(), resumed.transformer.state_dict()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def test_dit_models_latents_standardised_with_training_statistics(trained_vae, corpus, tmp_path):
    """The DiT learns `(z - mean) / std` per latent coordinate; the statistics come from the training cells' latents
    and travel in the pipeline's VAE config, so a reloaded pipeline decodes on the VAE's own scale."""
    from scldm_hf.models.modeling_scvae import SCVAEModel
    from scldm_hf.pipelines import SCLDMPipeline
    from scldm_hf.training.data import split_train_validation

    output_dir = tmp_path / "pipeline"
    pipeline = train_dit(tiny_config(DiTTrainingConfig, "dit", output_dir=str(output_dir), data=str(corpus),
                                     vae_name_or_path=str(trained_vae)))
    assert SCVAEModel.from_pretrained(trained_vae).config.latents_mean is None, "the stage-1 folder was modified"

    cache = datasets.Dataset.from_file(str(next((output_dir / "latent_cache").glob("*.arrow"))))
    train, _ = split_train_validation(cache.with_format("numpy", columns=["latents"]), 0.1, 0)
    latents = torch.from_numpy(train[:]["latents"])
    standardised = pipeline.vae.normalize_latents(latents)
    torch.testing.assert_close(standardised.mean(dim=0), torch.zeros_like(latents[0]), rtol=0, atol=1e-3)  # float32 sums
    torch.testing.assert_close(standardised.std(dim=0), torch.ones_like(latents[0]), rtol=0, atol=1e-3)
    torch.testing.assert_close(pipeline.vae.denormalize_latents(standardised), latents)

    reloaded = SCLDMPipeline.from_pretrained(output_dir)
    assert reloaded.vae.config.latents_mean == pipeline.vae.config.latents_mean
    assert reloaded.vae.config.latents_std == pipeline.vae.config.latents_std


def test_sigkill_during_checkpoint_write_then_resume(trained_vae, corpus, tmp_path):
    """kill -9 while checkpoint-8 is being written: checkpoint-4 stays usable and the resumed run ends bit-identical
    to the uninterrupted one."""
    output_dir = tmp_path / "killed"
    command = [sys.executable, str(REPO / "training" / "train_vae.py"), "--config", str(TINY),
               "--data", str(corpus), "--output_dir", str(output_dir)]
    env = os.environ | {WRITE_DELAY_ENV: "4", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = output_dir / "checkpoints" / ".tmp-checkpoint-8"
    deadline = time.monotonic() + 120
    while not (partial / "model.safetensors").is_file():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "checkpoint-8 was never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert [path.name for path in list_checkpoints(output_dir / "checkpoints")] == ["checkpoint-4"]
    assert partial.is_dir()

    resumed = train_vae(tiny_config(VAETrainingConfig, "vae", data=str(corpus), output_dir=str(output_dir),
                                    resume_from_checkpoint="latest"))
    assert not partial.exists()
    assert [path.name for path in list_checkpoints(output_dir / "checkpoints")] == ["checkpoint-8", "checkpoint-12"]
    expected = load_file(trained_vae / "model.safetensors")
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_resume_with_other_batch_size_is_refused(trained_vae, corpus, tmp_path):
    output_dir = tmp_path / "other"
    shutil.copytree(trained_vae / "checkpoints", output_dir / "checkpoints")
    config = tiny_config(VAETrainingConfig, "vae", data=str(corpus), output_dir=str(output_dir), batch_size=20,
                         resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match=r"training\.batch_size: 10 in the checkpoint, 20 now"):
        train_vae(config)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# a rank still alive after this many seconds prints every thread's stack to stderr and exits (a hang reports where)
WORKER_WATCHDOG_S = 150

WORKER = f"""
import faulthandler
faulthandler.dump_traceback_later({WORKER_WATCHDOG_S}, exit=True)
""" + """
import json, os, sys
from safetensors.torch import save_file
from scldm_hf.data import CellCollator
from scldm_hf.training import VAETrainingConfig, load_config
from scldm_hf.training.vae import train_vae

seen = []
collate = CellCollator.__call__
def record_then_collate(self, rows):
    seen.extend(row["cell_id"] for row in rows)
    return collate(self, rows)
CellCollator.__call__ = record_then_collate

config = load_config(VAETrainingConfig, sys.argv[1], json.loads(sys.argv[2]), section="vae")
model = train_vae(config)
rank = os.environ["RANK"]
with open(f"{config.output_dir}/cells_rank{rank}.json", "w") as file:
    json.dump(seen, file)
save_file(model.state_dict(), f"{config.output_dir}/weights_rank{rank}.safetensors")
"""


def _launch_two_cpu_processes(worker: Path, overrides: dict) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of `worker` on CPU, over the loopback interface."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
               str(worker), str(TINY), json.dumps(overrides)]
    # no GPU visible: on a one-GPU machine both ranks would otherwise be placed on cuda:0 and cuda:1
    environment = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=WORKER_WATCHDOG_S + 60)


def test_two_cpu_processes_train_one_model_on_disjoint_halves(corpus, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: one epoch of 200 cells, 10 per batch and process."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    output_dir = tmp_path / "ddp"
    overrides = {"output_dir": str(output_dir), "data": str(corpus), "validation_fraction": 0, "max_train_steps": 10}
    result = _launch_two_cpu_processes(worker, overrides)
    hang = result.stderr.find("Timeout (0:")
    if hang >= 0:  # a rank hung (~1.5 % of launches: torch's gloo teardown): report where, then launch again
        warnings.warn(f"the two-process launch hung; the ranks' stacks:\n{result.stderr[hang:hang + 6000]}",
                      stacklevel=1)
        shutil.rmtree(output_dir, ignore_errors=True)
        result = _launch_two_cpu_processes(worker, overrides)
    assert result.returncode == 0, result.stderr[-6000:]

    cells = [set(json.loads((output_dir / f"cells_rank{rank}.json").read_text())) for rank in (0, 1)]
    assert len(cells[0]) == len(cells[1]) == NUM_CELLS // 2
    assert not cells[0] & cells[1]
    assert len(cells[0] | cells[1]) == NUM_CELLS
    weights = [load_file(output_dir / f"weights_rank{rank}.safetensors") for rank in (0, 1)]
    saved = load_file(output_dir / "model.safetensors")
    initial = load_file(output_dir / "checkpoints" / "checkpoint-4" / "model.safetensors")
    for name in saved:
        assert torch.equal(weights[0][name], weights[1][name]), name
        assert torch.equal(weights[0][name], saved[name]), name
    assert any(not torch.equal(initial[name], saved[name]) for name in saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU (there a "
                    "multi-process launch without --cpu would train independent copies)")
def test_multi_process_launch_without_cpu_flag_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tiny_config(VAETrainingConfig, "vae", output_dir=str(tmp_path), cpu=False)  # the user forgot --cpu
    with pytest.raises(ConfigurationError, match="pass --cpu"):
        build_accelerator(config)


@pytest.mark.parametrize("option, default, in_recipe, on_command_line, unknown", [
    ("coupling", "independent", "minibatch_ot", "minibatch_ot_by_label", "sinkhorn"),  # the released scLDM's draws
    ("timestep_sampling", "uniform", "logit_normal", "uniform", "cosine"),  # the released scLDM's noise levels
])
def test_dit_option_round_trips_through_recipe_command_line_and_saved_training_config(
        tmp_path, option, default, in_recipe, on_command_line, unknown):
    from scldm_hf.training.model_card import portable_config

    assert getattr(tiny_config(DiTTrainingConfig, "dit"), option) == default
    recipe, recipe_values = tmp_path / "recipe.yaml", yaml.safe_load(TINY.read_text())
    recipe_values["dit"][option] = in_recipe
    recipe.write_text(yaml.safe_dump(recipe_values))
    assert getattr(load_config(DiTTrainingConfig, recipe, section="dit"), option) == in_recipe
    config = RecipeParser(DiTTrainingConfig, "dit").parse(["--config", str(recipe), f"--{option}", on_command_line])
    assert getattr(config, option) == on_command_line
    saved = tmp_path / "training_config.yaml"  # what publish_model_folder writes beside the pipeline
    saved.write_text(yaml.safe_dump(portable_config(config)))
    assert yaml.safe_load(saved.read_text())[option] == on_command_line
    with pytest.raises(ConfigurationError, match=f"{option}='{unknown}' is not one of"):
        tiny_config(DiTTrainingConfig, "dit", **{option: unknown})


def test_timestep_sampling_option_reaches_the_training_loss():
    from scldm_hf.flow_matching import flow_matching_loss
    from scldm_hf.training.dit import FlowMatchingObjective

    transformer = LatentDiTTransformer(num_latent_tokens=2, latent_dim=4, covariate_num_labels={"cell_type": 3},
                                       hidden_size=16, num_layers=1, num_attention_heads=2)
    with torch.no_grad():  # off the zero-initialised output layer, whose prediction does not depend on the noise level
        for parameter in transformer.parameters():
            parameter.normal_(std=0.2, generator=torch.Generator().manual_seed(1))
    latents, labels = torch.randn(32, 2, 4), {"cell_type": torch.randint(0, 3, (32,))}

    def seeded(loss):
        torch.manual_seed(0)
        return loss()

    objective = FlowMatchingObjective(transformer, 0.1, "joint", "independent", "logit_normal")
    trained = seeded(lambda: objective(latents, labels))
    torch.testing.assert_close(trained, seeded(lambda: flow_matching_loss(transformer, latents, labels, "logit_normal")))
    assert not torch.equal(trained, seeded(lambda: flow_matching_loss(transformer, latents, labels, "uniform")))
