"""
Converts the authors' MATPAC checkpoints into `save_pretrained` directories.

Two inputs are understood: the released inference weights (a flat state dict of the student encoder, as
`torch.load` returns it) and a full training state (the same plus the predictor, the student head, the centre, and
the teachers as the nested dicts `_ema` and `_cls_head_ema`), of MATPAC or of MATPAC++ (whose `mcl_heads` replace
the predictor's projection). Sizes are read from the tensor shapes; the head counts, which shapes cannot tell, are
arguments.

    python -m modeling_matpac.convert --checkpoint matpac_10_2048.pt --output_dir matpac-base
"""

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration_matpac import MatpacConfig
from .feature_extraction_matpac import MatpacFeatureExtractor
from .modeling_matpac import MatpacForPreTraining, MatpacModel, MatpacPreTrainedModel


logger = logging.getLogger(__name__)

# The one mapping between the authors' key names and ours, applied in order: the first matching prefix rule, then
# every suffix rule. Keys of `MatpacForPreTraining`; a `MatpacModel` drops the `matpac.` prefix.
PREFIX_RULES = [
    (r"^cls_token$", "matpac.embeddings.cls_token"),
    (r"^pos_embed$", "matpac.embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "matpac.embeddings.patch_embeddings.projection."),
    (r"^student_encoder\.blocks\.(\d+)\.", r"matpac.encoder.layers.\1."),
    (r"^student_encoder\.norm\.", "matpac.encoder.layernorm."),
    (r"^_ema\.blocks\.(\d+)\.", r"teacher_encoder.layers.\1."),
    (r"^_ema\.norm\.", "teacher_encoder.layernorm."),
    (r"^decoder\.mask_token$", "predictor.mask_token"),
    (r"^decoder\.decoder_pos_embed$", "predictor.position_embeddings"),
    (r"^decoder\.decoder_embed\.", "predictor.embed."),
    (r"^decoder\.decoder_blocks\.(\d+)\.", r"predictor.layers.\1."),
    (r"^decoder\.decoder_norm\.", "predictor.layernorm."),
    (r"^decoder\.decoder_pred\.", "predictor.projection."),
    (r"^mcl_heads\.mcl_heads\.(\d+)\.", r"mcl_heads.heads.\1."),
    (r"^cls_head_loss\.center$", "center"),
    (r"^cls_student_head\.", "student_head."),
    (r"^_cls_head_ema\.", "teacher_head."),
]
SUFFIX_RULES = [
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.qkv\.", ".attention.qkv_proj."),
    (r"\.attn\.proj\.", ".attention.out_proj."),
    (r"\.last_layer\.weight_g$", ".last_layer.parametrizations.weight.original0"),
    (r"\.last_layer\.weight_v$", ".last_layer.parametrizations.weight.original1"),
]
# The inference wrapper's torchaudio buffers: front-end constants, not weights (our feature extractor computes them).
FRONT_END_KEYS = re.compile(r"^log_mel\.")
# Authors' keys that only the pre-training model has.
TRAINING_ONLY_KEYS = re.compile(r"^(_ema|_cls_head_ema|decoder|mcl_heads|cls_student_head|cls_head_loss)\.")
# MATPAC++ builds, saves and never uses the predictor's single projection: its MCL heads predict instead.
UNUSED_WITH_MCL_KEYS = re.compile(r"^decoder\.decoder_pred\.")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a `.pt` / `.safetensors` checkpoint into a flat dict, `_ema` / `_cls_head_ema` flattened with a dot."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        raw = load_file(path)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
        raw = raw["model"]  # a fairseq training checkpoint
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict.")

    flat = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": tensor for inner, tensor in value.items()})
        elif isinstance(value, torch.Tensor):
            flat[key] = value
        else:
            raise ValueError(f"Entry {key!r} of {path} is a {type(value).__name__}, not a tensor.")
    return flat


def rename_key(key: str) -> str | None:
    """Our name for one of the authors' keys (as `MatpacForPreTraining` holds it), or None if it is unknown."""
    for pattern, replacement in PREFIX_RULES:
        if re.match(pattern, key):
            renamed = re.sub(pattern, replacement, key)
            for suffix, suffix_replacement in SUFFIX_RULES:
                renamed = re.sub(suffix, suffix_replacement, renamed)
            return renamed
    return None


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"^{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    predictor_num_attention_heads: int | None = None,
    **overrides,
) -> MatpacConfig:
    """
    Builds the config from the tensor shapes. Head counts default to 64-dimensional encoder heads (ViT-B: 12) and
    32-dimensional predictor heads (512 / 16), the published model's sizes.
    """
    for required in ("cls_token", "pos_embed", "patch_embed.proj.weight", "student_encoder.blocks.0.mlp.fc1.weight"):
        if required not in state_dict:
            raise ValueError(f"The checkpoint has no {required!r}: it is not a MATPAC encoder state dict.")
    hidden_size = state_dict["cls_token"].shape[-1]
    patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    num_mel_bins = overrides.pop("num_mel_bins", MatpacConfig().num_mel_bins)
    num_positions = state_dict["pos_embed"].shape[1] - 1
    kwargs = dict(
        num_mel_bins=num_mel_bins,
        patch_size=patch_size,
        num_frames=num_positions // (num_mel_bins // patch_size) * patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=_count_blocks(state_dict, "student_encoder.blocks."),
        num_attention_heads=num_attention_heads or max(hidden_size // 64, 1),
        intermediate_size=state_dict["student_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="student_encoder.blocks.0.attn.qkv.bias" in state_dict,
    )
    if "decoder.decoder_embed.weight" in state_dict:
        predictor_hidden_size = state_dict["decoder.decoder_embed.weight"].shape[0]
        kwargs.update(
            predictor_hidden_size=predictor_hidden_size,
            predictor_num_hidden_layers=_count_blocks(state_dict, "decoder.decoder_blocks."),
            predictor_num_attention_heads=predictor_num_attention_heads or max(predictor_hidden_size // 32, 1),
            predictor_intermediate_size=state_dict["decoder.decoder_blocks.0.mlp.fc1.weight"].shape[0],
        )
    num_hypotheses = _count_blocks(state_dict, "mcl_heads.mcl_heads.")
    if num_hypotheses:
        kwargs["predictor_num_hypotheses"] = num_hypotheses
    if "cls_student_head.last_layer.weight_v" in state_dict:
        mlp_weights = sorted(
            (int(match.group(1)), tensor)
            for key, tensor in state_dict.items()
            if (match := re.match(r"^cls_student_head\.mlp\.(\d+)\.weight$", key))
        )
        kwargs.update(
            head_num_layers=len(mlp_weights),
            head_hidden_size=mlp_weights[0][1].shape[0] if len(mlp_weights) > 1 else MatpacConfig().head_hidden_size,
            head_bottleneck_size=mlp_weights[-1][1].shape[0],
            head_num_prototypes=state_dict["cls_student_head.last_layer.weight_v"].shape[0],
        )
    kwargs.update(overrides)
    return MatpacConfig(**kwargs)


def convert_state_dict(
    original: Mapping[str, torch.Tensor], config: MatpacConfig, encoder_only: bool
) -> MatpacPreTrainedModel:
    """
    Loads the authors' tensors into a `MatpacModel` (`encoder_only`) or a `MatpacForPreTraining`. Unknown keys and
    missing weights are errors that list the keys; dropped training-only keys and front-end buffers are logged.
    """
    unknown = sorted(key for key in original if rename_key(key) is None and not FRONT_END_KEYS.match(key))
    if unknown:
        raise ValueError(f"{len(unknown)} keys of the checkpoint are not MATPAC weights: {unknown}")
    ignored = sorted(key for key in original if FRONT_END_KEYS.match(key))
    if ignored:
        logger.info("Ignored %d front-end buffers (recomputed by the feature extractor): %s", len(ignored), ignored)
    dropped = sorted(key for key in original if encoder_only and TRAINING_ONLY_KEYS.match(key))
    if dropped:
        logger.info("Dropped %d training-only tensors (teachers, predictor, heads, centre).", len(dropped))
    elif config.predictor_num_hypotheses > 1:
        dropped = sorted(key for key in original if UNUSED_WITH_MCL_KEYS.match(key))
        if dropped:
            logger.info("Dropped the predictor projection MATPAC++ never uses (its MCL heads predict): %s", dropped)

    prefix = "matpac." if encoder_only else ""
    converted = {
        rename_key(key).removeprefix(prefix): tensor
        for key, tensor in original.items()
        if key not in ignored and key not in dropped
    }
    model = (MatpacModel if encoder_only else MatpacForPreTraining)(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint does not fit a {type(model).__name__} of the inferred sizes: missing {missing}, "
            f"unexpected {unexpected}."
        )
    wrong_shapes = [
        f"{key}: {tuple(tensor.shape)} vs {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong_shapes:
        raise ValueError(f"Tensor shapes do not match the inferred config: {wrong_shapes}")
    model.load_state_dict(converted, strict=True)
    return model


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    encoder_only: bool | None = None,
    num_attention_heads: int | None = None,
    predictor_num_attention_heads: int | None = None,
) -> MatpacPreTrainedModel:
    """
    Converts a checkpoint file and saves model, config and feature extractor in `output_dir`. A training state
    becomes a `MatpacForPreTraining` unless `encoder_only`; inference weights always become a `MatpacModel`.
    """
    original = load_original_state_dict(checkpoint)
    has_training_state = any(TRAINING_ONLY_KEYS.match(key) for key in original)
    if encoder_only is None:
        encoder_only = not has_training_state
    if not encoder_only and not has_training_state:
        raise ValueError(f"{checkpoint} holds only encoder weights; it cannot make a pre-training model.")
    config = infer_config(original, num_attention_heads, predictor_num_attention_heads)
    model = convert_state_dict(original, config, encoder_only)
    model.save_pretrained(output_dir)
    MatpacFeatureExtractor.from_model_config(config).save_pretrained(output_dir)
    logger.info("Saved a %s (%d parameters) to %s", type(model).__name__, model.num_parameters(), output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="The authors' .pt (or .safetensors) checkpoint.")
    parser.add_argument("--output_dir", required=True, help="Where to write the converted model.")
    parser.add_argument(
        "--encoder_only",
        action="store_true",
        help="Keep only the student encoder of a training checkpoint (a `MatpacModel`).",
    )
    parser.add_argument("--num_attention_heads", type=int, help="Encoder heads (default: hidden size / 64).")
    parser.add_argument("--predictor_num_attention_heads", type=int, help="Predictor heads (default: width / 32).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            encoder_only=True if args.encoder_only else None,
            num_attention_heads=args.num_attention_heads,
            predictor_num_attention_heads=args.predictor_num_attention_heads,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
