"""Attention through the libraries' interfaces: transformers' `attn_implementation` for the VAE, diffusers'
attention processors for the DiT; checkpoint parameter names unchanged."""

import copy

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from scldm_hf.models import SCVAEConfig, SCVAEModel
from scldm_hf.models.layers import ATTENTION_FUNCTIONS, FEW_KEYS, eager_attention_forward
from scldm_hf.models.transformer_latent_dit import LatentDiTAttnProcessor, LatentDiTTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_GENES = 60


@pytest.fixture
def config() -> SCVAEConfig:
    return SCVAEConfig(gene_names=[f"gene{i}" for i in range(NUM_GENES)], hidden_size=16, num_latent_tokens=4,
                       latent_dim=8, num_attention_heads=2, encoder_layers=1, decoder_layers=1)


def _cells() -> dict[str, torch.Tensor]:
    """2 cells of 50 gene tokens (more than FEW_KEYS: the encoder's fused-kernel path), the second padded after 40."""
    generator = torch.Generator().manual_seed(0)
    gene_ids = torch.stack([torch.randperm(NUM_GENES, generator=generator)[:50] + 1 for _ in range(2)])
    gene_ids[1, 40:] = 0
    counts = torch.randint(1, 20, gene_ids.shape, generator=generator).float() * (gene_ids > 0)
    panel = torch.arange(1, NUM_GENES + 1)
    panel_counts = torch.zeros(2, NUM_GENES + 1).scatter_add_(1, gene_ids, counts)[:, 1:]
    return {"gene_ids": gene_ids, "counts": counts, "attention_mask": gene_ids > 0, "library_size": counts.sum(1),
            "panel_gene_ids": panel, "panel_counts": panel_counts}


def test_vae_eager_and_sdpa_attention_agree_and_load_from_a_saved_model(config, tmp_path):
    assert 50 > FEW_KEYS
    torch.manual_seed(0)
    SCVAEModel(copy.deepcopy(config)).save_pretrained(tmp_path)
    models = {name: SCVAEModel.from_pretrained(tmp_path, attn_implementation=name) for name in ("eager", "sdpa")}
    assert {name: model.config._attn_implementation for name, model in models.items()} == {
        "eager": "eager", "sdpa": "sdpa"}
    assert SCVAEModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"  # transformers' default
    cells = _cells()
    outputs = {}
    for name, model in models.items():
        model.train()
        output = model(**cells)
        output.loss.backward()
        outputs[name] = (output.latents, output.mean, model.encoder.cross_attention.attention.k_proj.weight.grad)
    for eager, sdpa in zip(outputs["eager"], outputs["sdpa"]):
        torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outputs["eager"][0], outputs["sdpa"][0])  # two kernels, not one path twice

    models["sdpa"].set_attn_implementation("eager")
    assert models["sdpa"].config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(models["sdpa"].eval().encode(**_cells_tokens(cells)).latents,
                                   models["eager"].eval().encode(**_cells_tokens(cells)).latents, rtol=0, atol=0)


def _cells_tokens(cells: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: cells[name] for name in ("gene_ids", "counts", "attention_mask", "library_size")}


def test_sdpa_over_few_keys_is_the_eager_path_with_sdpa_numbers():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 2, 40, 8, generator=generator)
    key, value = torch.randn(2, 3, 2, FEW_KEYS, 8, generator=generator)
    mask = torch.ones(3, 1, 1, FEW_KEYS, dtype=torch.bool)
    mask[0, ..., 20:] = False
    module = torch.nn.Module()
    arguments = (module, query, key, value, mask)
    few_keys, _ = ATTENTION_FUNCTIONS["sdpa"](*arguments, scaling=8**-0.5)
    torch.testing.assert_close(few_keys, eager_attention_forward(*arguments, scaling=8**-0.5)[0], rtol=0, atol=0)
    torch.testing.assert_close(few_keys, sdpa_attention_forward(*arguments, scaling=8**-0.5)[0], rtol=1e-6, atol=1e-6)


class RecordingProcessor:
    """A user's processor: eager attention, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        query, key, value = (projection(hidden_states).unflatten(-1, (attn.heads, attn.head_dim)).transpose(1, 2)
                             for projection in (attn.q_proj, attn.k_proj, attn.v_proj))
        attended = eager_attention_forward(attn, query, key, value, None, scaling=attn.head_dim**-0.5)[0]
        return attn.o_proj(attended.flatten(-2))


def test_dit_attention_processors_can_be_swapped_and_keep_parameter_names():
    torch.manual_seed(0)
    transformer = LatentDiTTransformer(num_latent_tokens=4, latent_dim=4, hidden_size=16, num_layers=2,
                                       num_attention_heads=2, timestep_embedding_dim=16,
                                       covariate_num_labels={"cell_type": 3})
    for parameter in transformer.parameters():  # out of the zero initialisation, so attention shows in the output
        torch.nn.init.normal_(parameter, std=0.3)
    assert sorted(transformer.attn_processors) == [f"transformer_blocks.{i}.attention.processor" for i in (0, 1)]
    assert all(isinstance(processor, LatentDiTAttnProcessor) for processor in transformer.attn_processors.values())
    assert "transformer_blocks.0.attention.q_proj.weight" in transformer.state_dict()
    assert not any("processor" in name for name in transformer.state_dict())

    latents, timestep = torch.randn(3, 4, 4), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        default = transformer(latents, timestep, {"cell_type": torch.tensor([0, 1, 3])}).sample
        recording = RecordingProcessor()
        transformer.set_attn_processor(recording)
        swapped = transformer(latents, timestep, {"cell_type": torch.tensor([0, 1, 3])}).sample
    assert recording.calls == 2
    torch.testing.assert_close(swapped, default, rtol=1e-5, atol=1e-5)
    assert default.abs().max() > 0.1

    transformer.set_attn_processor({name: LatentDiTAttnProcessor() for name in transformer.attn_processors})
    with torch.no_grad():
        torch.testing.assert_close(transformer(latents, timestep, {"cell_type": torch.tensor([0, 1, 3])}).sample,
                                   default, rtol=0, atol=0)
    assert recording.calls == 2
