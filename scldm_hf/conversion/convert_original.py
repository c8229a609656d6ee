"""Convert the released scLDM checkpoints (Lightning `.ckpt` + Hydra `.yaml`, Palla et al. 2025) into an `SCLDMPipeline`.

The checkpoint is read with `torch.load(weights_only=True)` (or as safetensors) and only its `state_dict` is used; the
architecture comes from the Hydra YAML (read with `yaml.safe_load`, `${a.b.c}` interpolations resolved) and from the
weights' shapes. Size-factor pickles are read by a restricted unpickler that accepts nothing but plain data. No code
from the checkpoint or the authors' package is run. The options that reproduce the released architecture are listed
in docs/DESIGN.md ("Released scLDM checkpoints").
"""

import re
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file

from scldm_hf.errors import CheckpointError, ConfigurationError
from scldm_hf.models.conditioning import ANY_LABEL, CellConditioner
from scldm_hf.models.configuration_scvae import SCVAEConfig
from scldm_hf.models.layers import swiglu_intermediate_size
from scldm_hf.models.modeling_scvae import SCVAEModel
from scldm_hf.models.transformer_latent_dit import LatentDiTTransformer
from scldm_hf.pipelines.pipeline_scldm import SCLDMPipeline
from scldm_hf.pipelines.scheduling_flow_match_ode import FlowMatchODESolverScheduler

from .safe_pickle import load_plain_pickle

CONVERTER_VERSION = "1.0"
VAE_PREFIX = "vae_model."
DIT_PREFIX = "diffusion_model."
EMA_PREFIX = "ema_model.ema_model."  # ema_pytorch's EMA wrapper, an attribute `ema_model` of the Lightning module
FLOW_MATCHING_PREFIX = "nnet."  # scLDM.CD4 wraps its DiT in `scg_vae.diffusion.FlowMatching(nnet=DiT)`
CD4_PACKAGE = "scg_vae"
CD4_HUB_ID = "biohub/scldm_cd4"
# the released samplers' torchdiffeq tolerances when the config's generation_args name none: (atol, rtol)
ODE_TOLERANCES = {"scldm": (1e-5, 1e-5), CD4_PACKAGE: (1e-6, 1e-3)}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


class _OmegaConfYamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `1e-8` (no dot) as a float, as OmegaConf does for Hydra configs."""


_OmegaConfYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def resolve_interpolations(node, root: dict):
    """Resolve absolute `${a.b.c}` references of a Hydra config against `root` (others are left as written)."""
    if isinstance(node, dict):
        return {key: resolve_interpolations(value, root) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve_interpolations(value, root) for value in node]
    if not isinstance(node, str):
        return node
    while (match := _INTERPOLATION.search(node)) is not None:
        value = root
        for key in match.group(1).split("."):
            if not isinstance(value, dict) or key not in value:
                return node
            value = value[key]
        value = resolve_interpolations(value, root)
        if match.group(0) == node:
            return value
        node = node.replace(match.group(0), str(value))
    return node


def read_hydra_yaml(path: str | Path) -> dict:
    """A Hydra YAML file as a dict, read as OmegaConf reads it (`1e-8` is a float), interpolations left as written."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Config {path} does not exist; pass the .yaml released next to the checkpoint.")
    try:
        config = yaml.load(path.read_text(), Loader=_OmegaConfYamlLoader)
    except yaml.YAMLError as error:
        raise CheckpointError(f"Config {path} is not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"Config {path} is not a YAML mapping; pass the Hydra config of the checkpoint.")
    return config


def load_original_config(path: str | Path) -> dict:
    """The `model` section of a released Hydra YAML (or a model-group YAML such as `vae_base.yaml` itself)."""
    config = read_hydra_yaml(path)
    model = config.get("model", config)
    root = {**config, "model": model}
    model = resolve_interpolations(model, root)
    if not isinstance(model.get("module"), dict) or "vae_model" not in model["module"]:
        raise CheckpointError(f"Config {path} has no model.module.vae_model section; is it an scLDM Hydra config?")
    return model


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning `.ckpt` (its `state_dict`, loaded with `weights_only=True`) or a `.safetensors`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        message = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"Checkpoint {path} cannot be read as weights only ({message}); nothing in it was executed."
        ) from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise CheckpointError(f"Checkpoint {path} holds no state_dict of tensors; is it a Lightning checkpoint?")
    return state_dict


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _dit_weights(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The DiT's tensors under `prefix`, also when it sits inside CD4's `FlowMatching` wrapper (`prefix` + `nnet.`)."""
    weights = _strip_prefix(state_dict, prefix)
    return _strip_prefix(weights, FLOW_MATCHING_PREFIX) or weights


def _source_package(model_config: dict) -> str:
    """`"scg_vae"` for an scLDM.CD4 config, else `"scldm"` (from the package of the module's `_target_`)."""
    target = str(model_config["module"].get("_target_", ""))
    return CD4_PACKAGE if target.startswith(f"{CD4_PACKAGE}.") else "scldm"


def _target_name(node: dict) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"The released config uses {message}, which the converter does not support.")


def vae_config_from_original(model_config: dict, state_dict: dict[str, torch.Tensor], gene_names: list[str]):
    """`SCVAEConfig` reproducing the released `TransformerVAE` (`state_dict` without the `vae_model.` prefix)."""
    vae = model_config["module"]["vae_model"]
    encoder, decoder, head = vae["encoder"], vae["decoder"], vae["decoder_head"]
    agg_func = vae["input_layer"]["agg_func"]
    _require(agg_func in ("log1p", "softbin"), f"input layer agg_func={agg_func!r}")
    if (agg_func == "softbin") != ("input_layer.projection.bin_embeddings" in state_dict):
        raise CheckpointError(
            f"The config's input layer agg_func={agg_func!r} does not match the checkpoint's input-layer weights; "
            "pass the config released with this checkpoint."
        )
    soft_bins = agg_func == "softbin"
    _require(_target_name(head) == "NegativeBinomialTransformerLayer", f"decoder head {head.get('_target_')}")
    _require(not encoder.get("bias", False), "biased VAE projections")
    _require(encoder.get("latent_projection_type", "mlp") == "mlp", "a cross-attention latent projection")
    _require(decoder.get("shared_embedding", True) and not decoder.get("use_adaln", False), "a decoder gene table")
    cd4_head = _source_package(model_config) == CD4_PACKAGE  # CD4's head takes `t` but does not apply it
    _require(cd4_head or float(head.get("t", 1.0)) == 1.0, "a softmax temperature")
    _require(encoder["n_head"] == decoder["n_head"], "different encoder and decoder head counts")
    pos_embed = state_dict.get("encoder.pos_embed")
    _require(pos_embed is None or not pos_embed.any(), "a non-zero encoder positional embedding")
    num_genes = state_dict["input_layer.gene_embedding.weight"].shape[0] - 1
    if len(gene_names) != num_genes:
        raise ConfigurationError(f"{len(gene_names)} gene names were given but the checkpoint has {num_genes} genes.")
    return SCVAEConfig(
        gene_names=list(gene_names),
        hidden_size=encoder["n_embed"],
        num_latent_tokens=encoder["n_inducing_points"],
        latent_dim=encoder["n_embed_latent"],
        encoder_layers=encoder["n_layer"],
        decoder_layers=decoder["n_layer"],
        encoder_cross_attention_heads=encoder["n_head_cross"],
        decoder_cross_attention_heads=decoder["n_head_cross"],
        num_attention_heads=encoder["n_head"],
        intermediate_size=swiglu_intermediate_size(encoder["n_embed"], encoder["multiple_of"]),
        value_encoding="soft_bins" if soft_bins else "log1p",
        count_transform="none" if soft_bins else "log1p",
        num_count_bins=state_dict["input_layer.projection.bin_embeddings"].shape[0] if soft_bins else 10,
        count_bin_mlp_size=state_dict["input_layer.projection.mlp_count.0.weight"].shape[0] if soft_bins else 64,
        encode_all_genes=soft_bins,
        likelihood="negative_binomial",
        dispersion="gene" if head.get("shared_theta", False) else "gene-cell",
        gene_cell_dispersion_activation="exp",
        normalize_gene_embeddings=False,
        normalize_encoder_context=True,
        normalize_decoder_output=False,
        mask_padding_tokens=False,
        layer_norm_eps=float(encoder["layernorm_eps"]),
        attention_bias=False,
    )


def _attention(source: str, target: str, fused_qkv: bool) -> dict[str, tuple[str, ...]]:
    """Key map of one reference attention (`c_attn` = fused q/k/v or k/v, `c_attn_q`, `c_proj`) onto ours."""
    if fused_qkv:
        return {f"{source}.c_attn": tuple(f"{target}.{name}" for name in ("q_proj", "k_proj", "v_proj"))} | {
            f"{source}.c_proj": (f"{target}.o_proj",)
        }
    return {
        f"{source}.c_attn": (f"{target}.k_proj", f"{target}.v_proj"),
        f"{source}.c_attn_q": (f"{target}.q_proj",),
        f"{source}.c_proj": (f"{target}.o_proj",),
    }


def _mlp(source: str, target: str) -> dict[str, tuple[str, ...]]:
    return {f"{source}.w1": (f"{target}.gate_proj",), f"{source}.w2": (f"{target}.up_proj",),
            f"{source}.c_proj": (f"{target}.down_proj",)}


def _self_attention_block(source: str, target: str) -> dict[str, tuple[str, ...]]:
    return {f"{source}.ln_1": (f"{target}.attention_norm",), f"{source}.ln_2": (f"{target}.mlp_norm",)} | _attention(
        f"{source}.attn", f"{target}.attention", fused_qkv=True
    ) | _mlp(f"{source}.mlp", f"{target}.mlp")


def _cross_attention_block(source: str, target: str) -> dict[str, tuple[str, ...]]:
    return {
        f"{source}.ln_1": (f"{target}.context_norm",),
        f"{source}.ln_1q": (f"{target}.query_norm",),
        f"{source}.ln_2": (f"{target}.mlp_norm",),
    } | _attention(f"{source}.attn", f"{target}.attention", fused_qkv=False) | _mlp(f"{source}.mlp", f"{target}.mlp")


def _map_modules(
    state_dict: dict[str, torch.Tensor], module_map: dict[str, tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    """Rename `source.weight/bias` to the targets, splitting fused weights evenly along dim 0 among them."""
    converted = {}
    for source, targets in module_map.items():
        for parameter in ("weight", "bias"):
            tensor = state_dict.get(f"{source}.{parameter}")
            if tensor is None:
                continue
            for target, chunk in zip(targets, tensor.chunk(len(targets), dim=0)):
                converted[f"{target}.{parameter}"] = chunk.clone()
    return converted


def convert_vae_state_dict(state_dict: dict[str, torch.Tensor], config: SCVAEConfig) -> dict[str, torch.Tensor]:
    """Released `TransformerVAE` weights (no `vae_model.` prefix) -> `SCVAEModel` weights."""
    module_map = {
        "input_layer.gene_embedding": ("gene_embedding",),
        "encoder.encoder_latent_input.0": ("encoder.latent_projection",),
        "decoder.decoder_latent_input.1": ("decoder.latent_projection",),
        "decoder_head.params": ("decoder.output_head",),
        "input_layer.projection.mlp_count.0": ("count_embedding.count_mlp.0",),
        "input_layer.projection.mlp_count.2": ("count_embedding.count_mlp.2",),
    }
    module_map |= _cross_attention_block("encoder.ca_layer", "encoder.cross_attention")
    module_map |= _cross_attention_block("decoder.decoder_cross_attention", "decoder.gene_readout")
    for index in range(config.encoder_layers):
        module_map |= _self_attention_block(f"encoder.encoder_layers.{index}", f"encoder.layers.{index}")
    for index in range(config.decoder_layers):
        module_map |= _self_attention_block(f"decoder.decoder_layers.{index}", f"decoder.layers.{index}")
    converted = _map_modules(state_dict, module_map)
    converted["encoder.latent_queries"] = state_dict["encoder.ca_layer.inducing_points"].clone()
    if config.value_encoding == "soft_bins":
        converted["count_embedding.bin_embeddings"] = state_dict["input_layer.projection.bin_embeddings"].clone()
    if config.dispersion == "gene":
        converted["log_inverse_dispersion"] = state_dict["decoder_head.theta.weight"][:, 0].clone()
    return converted


def dit_config_from_original(model_config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """`LatentDiTTransformer` config reproducing the released `DiT` (`state_dict` without its prefix)."""
    dit = model_config["module"]["diffusion_model"]
    dit = dit.get("nnet", dit)  # CD4: FlowMatching(nnet=DiT)
    _require(not dit.get("use_gpt_for_gene_ko", False), "GPT embeddings of the perturbed gene")
    transport = model_config["module"].get("transport", {})
    _require(transport.get("path_type", "Linear") == "Linear", f"transport path {transport.get('path_type')!r}")
    _require(transport.get("prediction", "velocity") == "velocity", f"prediction {transport.get('prediction')!r}")
    _require(float(dit.get("cfg_dropout_prob", 0.1)) > 0, "no null label (cfg_dropout_prob=0)")
    covariate_num_labels = {
        key.split(".")[1]: value.shape[0] - 1 for key, value in sorted(state_dict.items())
        if key.startswith("class_embeddings.")
    }
    return {
        "num_latent_tokens": dit["seq_len"],
        "latent_dim": dit["n_embed_input"],
        "hidden_size": dit["n_embed"],
        "num_layers": dit["n_layer"],
        "num_attention_heads": dit["n_head"],
        "intermediate_size": swiglu_intermediate_size(dit["n_embed"], dit["multiple_of"]),
        "timestep_embedding_dim": state_dict["t_embedder.mlp.0.weight"].shape[1],
        "covariate_num_labels": covariate_num_labels,
        "attention_bias": bool(dit["bias"]),
        "mlp_bias": False,
        "layer_norm_eps": float(dit["layernorm_eps"]),
        "flow_time": "data_fraction",
    }


def convert_dit_state_dict(state_dict: dict[str, torch.Tensor], transformer: LatentDiTTransformer):
    """Released `DiT` weights (no prefix) -> `LatentDiTTransformer` weights.

    The reference's block modulation is `[shift, scale, gate] x 2`, but its `modulate(x, scale, shift)` swaps the first
    two of each triple: the chunks are reordered to diffusers' `AdaLayerNormZero` order. Its final layer is
    `[shift, scale]`, diffusers' `AdaLayerNormContinuous` `[scale, shift]`. Biases the reference lacks become zeros.
    """
    num_layers = transformer.config.num_layers
    module_map = {
        "input_proj": ("proj_in",),
        "t_embedder.mlp.0": ("timestep_embedder.linear_1",),
        "t_embedder.mlp.2": ("timestep_embedder.linear_2",),
        "final_layer.linear": ("proj_out",),
    } | {f"class_embeddings.{name}": (f"covariate_embedders.{name}",) for name in transformer.covariate_names}
    for index in range(num_layers):
        block, target = f"blocks.{index}", f"transformer_blocks.{index}"
        module_map |= _attention(f"{block}.attn", f"{target}.attention", fused_qkv=True)
        module_map |= _mlp(f"{block}.mlp", f"{target}.mlp")
    converted = _map_modules(state_dict, module_map)
    for index in range(num_layers):
        for parameter in ("weight", "bias"):
            modulation = state_dict.get(f"blocks.{index}.adaln_modulation.1.{parameter}")
            if modulation is not None:
                chunks = modulation.chunk(6, dim=0)
                converted[f"transformer_blocks.{index}.attention_norm.linear.{parameter}"] = torch.cat(
                    [chunks[order] for order in (1, 0, 2, 4, 3, 5)]
                )
    for parameter in ("weight", "bias"):
        modulation = state_dict.get(f"final_layer.adaln_modulation.1.{parameter}")
        if modulation is not None:
            shift, scale = modulation.chunk(2, dim=0)
            converted[f"norm_out.linear.{parameter}"] = torch.cat([scale, shift])
    expected = transformer.state_dict()
    for key, value in expected.items():
        converted.setdefault(key, torch.zeros_like(value) if key.endswith(".bias") else None)
    missing = sorted(key for key, value in converted.items() if value is None)
    if missing:
        raise CheckpointError(f"The DiT weights lack {missing[:3]} ({len(missing)} tensors); is the checkpoint complete?")
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and not torch.allclose(pos_embed[0].double(), transformer.position_embedding[0].double(),
                                                    atol=1e-6):
        raise CheckpointError("The checkpoint's DiT positional embedding is not the fixed sin-cos one it should be.")
    return converted


def library_size_groups(
    mu: dict, sd: dict, covariate_labels: dict[str, list[str]]
) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor]:
    """The released per-condition log size factors as `CellConditioner` groups: `(label ids [C, K], log mean [C],
    log variance [C])`, columns in sorted covariate order.

    Two layouts are read: `{covariate: {label: value}}` (scLDM's independent statistics; the first covariate present,
    in sorted order, is used, as in the reference) and `{"<label>_<label>...": value}` (CD4's joint statistics; each
    part of a key is matched to the covariate that has that label, other covariates match any label).
    """
    names = sorted(covariate_labels)
    if set(mu) != set(sd):
        raise CheckpointError("The size-factor mean and sd pickles have different keys; pass a matching pair.")
    rows, means, sds = [], [], []
    nested = [name for name in names if isinstance(mu.get(name), dict)]
    if nested:
        name = nested[0]
        for label, value in mu[name].items():
            row = [ANY_LABEL] * len(names)
            row[names.index(name)] = _label_id(covariate_labels, name, str(label))
            rows.append(row), means.append(value), sds.append(sd[name][label])
    else:
        for key, value in mu.items():
            row = [ANY_LABEL] * len(names)
            for part in str(key).split("_"):
                owners = [name for name in names if part in covariate_labels[name]]
                if len(owners) != 1:
                    raise CheckpointError(
                        f"Size-factor key {key!r}: part {part!r} matches {len(owners) or 'no'} covariate labels; "
                        "pass --anndata with the training data so that labels are known."
                    )
                row[names.index(owners[0])] = covariate_labels[owners[0]].index(part)
            rows.append(row), means.append(value), sds.append(sd[key])
    if not rows or not all(isinstance(value, (int, float)) for value in means + sds):
        raise CheckpointError("The size-factor pickles hold no numbers per condition; they are not scLDM size factors.")
    log_var = torch.tensor(sds, dtype=torch.float64) ** 2
    return torch.tensor(rows, dtype=torch.long), torch.tensor(means, dtype=torch.float64), log_var


def _label_id(covariate_labels: dict[str, list[str]], name: str, label: str) -> int:
    if label not in covariate_labels[name]:
        raise CheckpointError(f"Size-factor label {label!r} of covariate {name!r} is not among its labels.")
    return covariate_labels[name].index(label)


def read_vocabularies(anndata_path: str | Path, covariates: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Gene names (`var_names`) and covariate labels (`obs[name].cat.categories`) of the training AnnData, in the
    order the released code numbered them."""
    import anndata as ad

    adata = ad.read_h5ad(anndata_path, backed="r")
    missing = [name for name in covariates if name not in adata.obs]
    if missing:
        raise ConfigurationError(f"{anndata_path} has no obs column(s) {missing} (the model's covariates).")
    labels = {name: [str(label) for label in adata.obs[name].astype("category").cat.categories] for name in covariates}
    return [str(gene) for gene in adata.var_names], labels


def convert_original_checkpoint(
    checkpoint: str | Path,
    config: str | Path,
    output_dir: str | Path,
    size_factors: tuple[str | Path, str | Path] | None = None,
    anndata: str | Path | None = None,
    use_ema: bool = True,
    base_model: str | None = None,
) -> Path:
    """Convert a released scLDM checkpoint into an `SCLDMPipeline` folder (or an `SCVAEModel` folder for a VAE-only
    checkpoint) at `output_dir`, with a model card naming the source.

    Args:
        checkpoint: Lightning `.ckpt` (or `.safetensors`) of `scldm.models.LatentDiffusion` or `VAE`.
        config: its Hydra `.yaml`.
        size_factors: the `(mu, sd)` log size-factor pickles; without them the library-size model is log-normal(0, 0),
            i.e. library size 1, as the released code uses when it has no statistics.
        anndata: the training AnnData, for gene names and label names; without it genes are `gene_<id>` and labels
            their ids (`"0"`, `"1"`, ...), in the released vocabulary order.
        use_ema: take the DiT's EMA weights (`ema_model.ema_model.*`) when the checkpoint has them.
        base_model: Hub id recorded as `base_model` in the card; defaults to `biohub/scldm_cd4` for an scLDM.CD4
            config (`_target_: scg_vae...`).
    """
    model_config = load_original_config(config)
    if base_model is None and _source_package(model_config) == CD4_PACKAGE:
        base_model = CD4_HUB_ID
    state_dict = load_original_state_dict(checkpoint)
    vae_weights = _strip_prefix(state_dict, VAE_PREFIX)
    if "input_layer.gene_embedding.weight" not in vae_weights:
        raise CheckpointError(f"Checkpoint {checkpoint} has no '{VAE_PREFIX}input_layer' weights; is it an scLDM one?")
    dit_weights = _dit_weights(state_dict, EMA_PREFIX) if use_ema else {}
    weights_used = "EMA" if dit_weights else "online (non-EMA)"
    dit_weights = dit_weights or _dit_weights(state_dict, DIT_PREFIX)
    covariates = sorted({key.split(".")[1] for key in dit_weights if key.startswith("class_embeddings.")})
    num_genes = vae_weights["input_layer.gene_embedding.weight"].shape[0] - 1
    if anndata is not None:
        gene_names, covariate_labels = read_vocabularies(anndata, covariates)
    else:
        gene_names = [f"gene_{index}" for index in range(1, num_genes + 1)]
        covariate_labels = {
            name: [str(index) for index in range(dit_weights[f"class_embeddings.{name}.weight"].shape[0] - 1)]
            for name in covariates
        }

    vae_config = vae_config_from_original(model_config, vae_weights, gene_names)
    vae = SCVAEModel(vae_config)
    vae.load_state_dict(convert_vae_state_dict(vae_weights, vae_config), strict=True)
    output_dir = Path(output_dir)
    if not dit_weights:
        vae.save_pretrained(output_dir)
        _write_card(output_dir, checkpoint, config, base_model, "VAE only (no DiT in the checkpoint)")
        return output_dir

    transformer = LatentDiTTransformer(**dit_config_from_original(model_config, dit_weights))
    transformer.load_state_dict(convert_dit_state_dict(dit_weights, transformer), strict=True)
    conditioner = CellConditioner(covariate_labels=covariate_labels)
    if transformer.config.covariate_num_labels != conditioner.num_labels:
        raise ConfigurationError(
            f"The AnnData's labels {conditioner.num_labels} do not match the checkpoint's {covariates} label counts "
            f"{transformer.config.covariate_num_labels}."
        )
    if size_factors is not None:
        mu, sd = (load_plain_pickle(path) for path in size_factors)
        if not isinstance(mu, dict) or not isinstance(sd, dict):
            raise CheckpointError(f"Size-factor pickles {size_factors} are not dicts.")
        label_ids, log_mean, log_var = library_size_groups(mu, sd, covariate_labels)
        conditioner.set_library_size_groups(label_ids, torch.ones(len(label_ids)), log_mean, log_var)
    generation = model_config["module"].get("generation_args") or {}
    atol, rtol = ODE_TOLERANCES[_source_package(model_config)]
    scheduler = FlowMatchODESolverScheduler(
        atol=float(generation.get("atol", atol)), rtol=float(generation.get("rtol", rtol))
    )
    pipeline = SCLDMPipeline(vae=vae, transformer=transformer, scheduler=scheduler, conditioner=conditioner)
    pipeline.save_pretrained(output_dir)
    _write_card(output_dir, checkpoint, config, base_model, f"{weights_used} DiT weights")
    return output_dir


def _write_card(output_dir: Path, checkpoint, config, base_model: str | None, weights_used: str) -> None:
    card_data = ModelCardData(library_name="scldm-hf", base_model=base_model, tags=["single-cell", "scldm"])
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# scLDM (converted)\n\n"
        f"Converted from the released scLDM checkpoint `{Path(checkpoint).name}` with config `{Path(config).name}` by "
        f"`scldm convert-original` (converter version {CONVERTER_VERSION}), using the {weights_used}.\n\n"
        "The architecture options that reproduce the released model are recorded in the configs; see docs/DESIGN.md "
        "of scldm-hf. The conversion was verified number for number against the authors' code with random weights.\n"
    )
    ModelCard(content).save(output_dir / "README.md")
