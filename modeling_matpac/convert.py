"""
Converts the authors' MATPAC and MATPAC++ checkpoints into `save_pretrained` directories with a model card.

The kind of file is read from its keys: encoder weights (a flat state dict of the student encoder, as `torch.load`
returns it; every released encoder) become a `MatpacModel`; the AudioSet fine-tuned classifier (the encoder plus
`head_norm.*` and `head.*`) a `MatpacForAudioClassification` with AudioSet's 527 labels, or with `--encoder_only` its
encoder; a full training state (the encoder plus the predictor, the student head, the centre, and the teachers as the
nested dicts `_ema` and `_cls_head_ema`; MATPAC++'s also has `mcl_heads`) a `MatpacForPreTraining`. A downstream
probe head (`probe.weight`, `probe.bias`) is converted together with the encoder it was trained on, into a
`MatpacForAudioClassification` with the task's labels. Sizes are read from the tensor shapes; the head counts, which
shapes cannot tell, are arguments.

    python -m modeling_matpac.convert --checkpoint matpac_10_2048.pt --output_dir matpac-base
    python -m modeling_matpac.convert --checkpoint matpac_10_2048.pt --probe_head esc50.pth --task esc50 \\
        --output_dir matpac-esc50
"""

import argparse
import importlib
import logging
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .configuration_matpac import MatpacConfig
from .conversion_card import write_model_card
from .feature_extraction_matpac import MatpacFeatureExtractor
from .labels import LABEL_MAPS, PROBE_TASKS, load_labels
from .modeling_matpac import (
    MatpacForAudioClassification,
    MatpacForPreTraining,
    MatpacModel,
    MatpacPreTrainedModel,
)


logger = logging.getLogger(__name__)

# The one mapping between the authors' key names and ours, applied in order: the first matching prefix rule, then
# every suffix rule. Keys of `MatpacForPreTraining` (heads: of `MatpacForAudioClassification`); a `MatpacModel` drops
# the `matpac.` prefix.
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
    (r"^head_norm\.", "embedding_norm."),
    (r"^head\.", "classifier."),
    (r"^probe\.", "classifier."),
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
# The AudioSet classifier on top of the fine-tuned encoder, and the downstream probe head (a file of its own).
AUDIOSET_HEAD_KEYS = re.compile(r"^head(_norm)?\.")
PROBE_KEYS = {"probe.weight", "probe.bias"}
ENCODER_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight"}
KINDS = ("encoder", "audioset_classifier", "pretraining", "probe_head")


# Data-only classes that a fairseq training checkpoint holds besides tensors: its arguments and the numpy numbers of
# its logged metrics. `torch.load(weights_only=True)` refuses them by default; none can run code when unpickled.
DATA_ONLY_GLOBALS = re.compile(
    r"^(argparse\.Namespace"
    r"|numpy(\._core|\.core)?\.multiarray\.(scalar|_reconstruct)"
    r"|numpy\.(dtype|ndarray)"
    r"|numpy\.dtypes\.\w+DType)$"
)


def unreadable_checkpoint(path: Path, error: Exception) -> ValueError:
    """One line for a file `torch.load` cannot read: its weights-only message wraps the cause in lines of advice."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    reason = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return ValueError(f"{path} is not a readable PyTorch checkpoint: {reason}")


def load_pickled_checkpoint(path: Path) -> object:
    """
    `torch.load` without running code from the file: tensors and containers, plus `DATA_ONLY_GLOBALS` (for fairseq
    training checkpoints). Any other class is refused in one line that says how to extract the weights instead.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_error = error
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    if not names:
        raise unreadable_checkpoint(path, first_error)
    refused = [name for name in names if not DATA_ONLY_GLOBALS.match(name)]
    if refused:
        raise ValueError(
            f"{path} holds objects that are not weights ({', '.join(refused)}), which loading would have to run as "
            "code: in an environment you trust, load it with weights_only=False, save its weights alone with "
            "torch.save (the state dict of its 'model' entry, or `.state_dict()` of a pickled module), and convert "
            "that file."
        )
    allowed = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        allowed.append((getattr(importlib.import_module(module), attribute), name))
    if any(name.startswith("numpy") for name in names):
        import numpy

        # A numpy scalar's dtype is rebuilt through its class, which the list of globals above does not name.
        allowed += [
            (getattr(numpy.dtypes, dtype), f"numpy.dtypes.{dtype}")
            for dtype in dir(numpy.dtypes)
            if dtype.endswith("DType")
        ]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise unreadable_checkpoint(path, error) from None


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a `.pt` / `.safetensors` checkpoint into a flat dict, `_ema` / `_cls_head_ema` flattened with a dot."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        try:
            raw = load_file(path)
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    else:
        raw = load_pickled_checkpoint(path)
    if isinstance(raw, Mapping) and "model" in raw and isinstance(raw["model"], Mapping):
        raw = raw["model"]  # a fairseq training checkpoint
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict.")

    flat = {}
    for key, value in raw.items():
        entries = {f"{key}.{inner}": tensor for inner, tensor in value.items()} if isinstance(value, Mapping) else {}
        for name, tensor in entries.items() or [(key, value)]:
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"Entry {name!r} of {path} is a {type(tensor).__name__}, not a tensor.")
            flat[name] = tensor
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


def _inverse_rule(pattern: str, replacement: str) -> tuple[str, str]:
    r"""The rule that undoes `(pattern, replacement)`: both are literal names but for `\.`, one `(\d+)` and anchors."""
    ours = re.escape(replacement).replace(re.escape("\\1"), r"(\d+)")
    authors = pattern.removeprefix("^").removesuffix("$").replace(r"\.", ".").replace(r"(\d+)", r"\1")
    return ("^" if pattern.startswith("^") else "") + ours + ("$" if pattern.endswith("$") else ""), authors


def authors_key(key: str) -> str:
    """
    The authors' name of one of our keys (as `MatpacForPreTraining` or the classifier holds it), undoing
    `rename_key`'s rules in reverse order, for messages: a classifier's `classifier.*` reads as the AudioSet `head.*`.
    """
    for pattern, replacement in reversed(SUFFIX_RULES):
        key = re.sub(*_inverse_rule(pattern, replacement), key)
    for pattern, replacement in PREFIX_RULES:
        inverse_pattern, inverse_replacement = _inverse_rule(pattern, replacement)
        if re.match(inverse_pattern, key):
            return re.sub(inverse_pattern, inverse_replacement, key)
    return key


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"^{re.escape(prefix)}(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


# The published model's widths, head widths and flags, by part: the weights do not tell the head count.
_PUBLISHED_HEADS = {
    "encoder": (768, 64, "ViT-B's 768", "num_attention_heads"),
    "predictor": (512, 32, "the paper's 512", "predictor_num_attention_heads"),
}


def _head_count(part: str, given: int | None, width: int) -> int:
    """`given`, else heads as wide as the published model's; for another width, the assumed count is said."""
    if given is not None:
        return given
    published_width, head_width, published, flag = _PUBLISHED_HEADS[part]
    count = max(width // head_width, 1)
    if width != published_width:
        logger.warning(
            "The %s is %d wide, not %s: its head count cannot be read from the weights, %d heads of %d are assumed "
            "(pass --%s if it was trained with others).",
            part, width, published, count, head_width, flag,
        )  # fmt: skip
    return count


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
        num_attention_heads=_head_count("encoder", num_attention_heads, hidden_size),
        intermediate_size=state_dict["student_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        qkv_bias="student_encoder.blocks.0.attn.qkv.bias" in state_dict,
    )
    if "decoder.decoder_embed.weight" in state_dict:
        predictor_hidden_size = state_dict["decoder.decoder_embed.weight"].shape[0]
        kwargs.update(
            predictor_hidden_size=predictor_hidden_size,
            predictor_num_hidden_layers=_count_blocks(state_dict, "decoder.decoder_blocks."),
            predictor_num_attention_heads=_head_count(
                "predictor", predictor_num_attention_heads, predictor_hidden_size
            ),
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


def detect_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which kind of the authors' files this is (one of `KINDS`), from its keys."""
    keys = set(state_dict)
    if keys and keys <= PROBE_KEYS:
        return "probe_head"
    if not ENCODER_KEYS <= keys:
        shown = sorted(keys)[:5]
        prefix = next(iter(keys), "").split(".")[0] + "."
        wrapped = all(key.startswith(prefix) for key in keys) and ENCODER_KEYS <= {key[len(prefix) :] for key in keys}
        hint = (
            f" Its keys all start with {prefix!r}: the weights are wrapped in a {prefix[:-1]!r} entry or prefix. Save "
            "them without it and convert that file."
            if wrapped
            else ""
        )
        raise ValueError(
            f"This is none of the known MATPAC checkpoints (encoder, AudioSet classifier, training state, probe "
            f"head): it has no {sorted(ENCODER_KEYS - keys)} and no probe.*; its first keys are {shown}.{hint}"
        )
    if any(TRAINING_ONLY_KEYS.match(key) for key in keys):
        return "pretraining"
    if any(AUDIOSET_HEAD_KEYS.match(key) for key in keys):
        return "audioset_classifier"
    return "encoder"


def head_config(task: str, num_outputs: int, **fields) -> dict:
    """Config fields of a released head with `num_outputs` outputs named by `task`'s label map."""
    labels = load_labels(task)
    if num_outputs != len(labels):
        raise ValueError(
            f"The head has {num_outputs} outputs but the {task} label map names {len(labels)} classes: "
            "this head is not for that task."
        )
    problem_type = "multi_label_classification" if LABEL_MAPS[task].multi_label else "single_label_classification"
    return dict(
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
        problem_type=problem_type,
        **fields,
    )


def _load_checked(model: MatpacPreTrainedModel, converted: dict[str, torch.Tensor]) -> MatpacPreTrainedModel:
    """
    Loads `converted` into `model`, refusing missing, unexpected and misshaped tensors with their names. A BatchNorm's
    `num_batches_tracked` may be missing (a state dict saved without it): the counter is read only by a BatchNorm
    without momentum, which MATPAC's head is not, so it starts at 0.
    """
    expected = model.state_dict()
    counters = sorted(key for key in expected if key.endswith(".num_batches_tracked") and key not in converted)
    if counters:
        logger.info("The checkpoint has no %s: set to 0 (the head's statistics do not depend on it).", counters)
        converted = {**converted, **{key: torch.zeros_like(expected[key]) for key in counters}}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    prefix = "matpac." if isinstance(model, MatpacModel) else ""
    if missing or unexpected:
        missing_originals = [authors_key(prefix + key) for key in missing]
        raise ValueError(
            f"The checkpoint does not fit a {type(model).__name__} of the inferred sizes: missing {missing}, "
            f"unexpected {unexpected}. Missing in the authors' naming: {missing_originals}."
        )
    wrong_shapes = [
        f"{authors_key(prefix + key)} ({key}): {tuple(tensor.shape)} vs {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong_shapes:
        raise ValueError(f"Tensor shapes do not match the inferred config: {wrong_shapes}")
    model.load_state_dict(converted, strict=True)
    return model


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
    return _load_checked((MatpacModel if encoder_only else MatpacForPreTraining)(config), converted)


def convert_classifier_state_dict(
    original: Mapping[str, torch.Tensor], config: MatpacConfig
) -> MatpacForAudioClassification:
    """Loads an encoder with its AudioSet head, or an encoder merged with a probe head, into the classifier."""
    unknown = sorted(key for key in original if rename_key(key) is None and not FRONT_END_KEYS.match(key))
    if unknown:
        raise ValueError(f"{len(unknown)} keys of the checkpoint are not MATPAC weights: {unknown}")
    converted = {rename_key(key): tensor for key, tensor in original.items() if not FRONT_END_KEYS.match(key)}
    return _load_checked(MatpacForAudioClassification(config), converted)


def read_probe_head(path: str | Path, embedding_size: int) -> dict[str, torch.Tensor]:
    """A released probe head: exactly `probe.weight` (n x embedding size) and `probe.bias`, else a clear error."""
    probe = load_original_state_dict(path)
    if set(probe) != PROBE_KEYS:
        raise ValueError(f"A probe head holds exactly {sorted(PROBE_KEYS)}; {path} holds {sorted(probe)[:5]}.")
    weight = probe["probe.weight"]
    if weight.ndim != 2 or weight.shape[1] != embedding_size:
        raise ValueError(
            f"The probe head {path} reads {tuple(weight.shape[1:])}-d embeddings, but this encoder's clip "
            f"embedding is {embedding_size}-d: the probe was trained on another model."
        )
    return probe


def conversion_command(checkpoint: Path, output_dir: Path, **options) -> str:
    """The command line that makes this conversion, with file names only (for the model card)."""
    words = ["python", "-m", "modeling_matpac.convert", "--checkpoint", checkpoint.name]
    for name, value in options.items():
        if value is True:
            words.append(f"--{name}")
        elif value not in (None, False):
            words += [f"--{name}", Path(value).name if isinstance(value, Path) else str(value)]
    return shlex.join(words + ["--output_dir", output_dir.name])


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    encoder_only: bool | None = None,
    num_attention_heads: int | None = None,
    predictor_num_attention_heads: int | None = None,
    kind: str | None = None,
    probe_head: str | Path | None = None,
    task: str | None = None,
    overwrite: bool = False,
) -> MatpacPreTrainedModel:
    """
    Converts a checkpoint file (with `probe_head`, an encoder and a probe head for `task`) and saves model, config,
    feature extractor and model card in `output_dir`, which must be empty unless `overwrite`. The kind is read from
    the keys; `kind` only confirms it. A training state becomes a `MatpacForPreTraining` and the AudioSet classifier a
    `MatpacForAudioClassification` unless `encoder_only`; encoder weights always become a `MatpacModel`.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} is a file, not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"--output_dir {str(output_dir)!r} is not empty: pass --overwrite_output_dir to replace what is there."
        )
    original = load_original_state_dict(checkpoint)
    try:
        detected = detect_kind(original)
    except ValueError as error:
        raise ValueError(f"{checkpoint}: {error}") from None
    if kind is not None and kind != detected:
        raise ValueError(f"{checkpoint} is of kind {detected} by its keys, not {kind}.")
    stored = sorted(
        {str(tensor.dtype) for tensor in original.values() if tensor.is_floating_point()} - {"torch.float32"}
    )
    if stored:  # the model is saved in float32: exact from float16 and bfloat16, rounded from float64
        logger.info("The checkpoint stores %s tensors; they are saved as float32.", " and ".join(stored))
    if detected == "probe_head":
        raise ValueError(
            f"{checkpoint} is a probe head: pass it as --probe_head, the encoder it was trained on as --checkpoint."
        )
    if (probe_head is None) != (task is None):
        raise ValueError("--probe_head and --task go together: the probe file and the task it was trained for.")
    if probe_head is not None and (detected != "encoder" or encoder_only is False):
        raise ValueError(f"A probe head goes on encoder weights; {checkpoint} is of kind {detected}.")
    if probe_head is not None and encoder_only:
        raise ValueError("--encoder_only and --probe_head contradict each other: a probe head makes a classifier.")
    if task is not None and task not in PROBE_TASKS:
        raise ValueError(f"--task must be one of {', '.join(PROBE_TASKS)}, got {task!r}.")
    named = [name for name in PROBE_TASKS if name in str(probe_head)]  # the authors' code reads the task from the path
    if task is not None and named and task not in named:
        raise ValueError(
            f"--task {task}, but the probe file {probe_head} is named for {' or '.join(named)}: a head of the same "
            "size for another task would give its outputs the wrong class names. Pass the task it was trained for."
        )
    if detected == "audioset_classifier" and encoder_only:
        head_keys = sorted(key for key in original if AUDIOSET_HEAD_KEYS.match(key))
        logger.info("Dropped the AudioSet head (%d tensors): %s", len(head_keys), head_keys)
        original = {key: tensor for key, tensor in original.items() if key not in head_keys}

    heads = dict(num_attention_heads=num_attention_heads, predictor_num_attention_heads=predictor_num_attention_heads)
    if probe_head is not None:
        encoder_config = infer_config(original, **heads)
        probe = read_probe_head(probe_head, encoder_config.embedding_size)
        fields = head_config(task, probe["probe.weight"].shape[0], freeze_encoder=True)
        config = infer_config(original, **heads, **fields)
        model = convert_classifier_state_dict({**original, **probe}, config)
    elif detected == "audioset_classifier" and not encoder_only:
        # Without `head.weight` the size check below reports it missing.
        num_outputs = (
            original["head.weight"].shape[0] if "head.weight" in original else LABEL_MAPS["audioset"].num_labels
        )
        fields = head_config("audioset", num_outputs, classifier_pooling="frequency_mean", classifier_batch_norm=True)
        config = infer_config(original, **heads, **fields)
        model = convert_classifier_state_dict(original, config)
    else:
        has_training_state = detected == "pretraining"
        if encoder_only is None:
            encoder_only = not has_training_state
        if not encoder_only and not has_training_state:
            raise ValueError(f"{checkpoint} holds only encoder weights; it cannot make a pre-training model.")
        config = infer_config(original, **heads)
        model = convert_state_dict(original, config, encoder_only)
    model.save_pretrained(output_dir)
    MatpacFeatureExtractor.from_model_config(config).save_pretrained(output_dir)
    command = conversion_command(
        checkpoint,
        output_dir,
        probe_head=None if probe_head is None else Path(probe_head),
        task=task,
        encoder_only=bool(encoder_only) and detected != "encoder",
        num_attention_heads=num_attention_heads,
        predictor_num_attention_heads=predictor_num_attention_heads,
    )
    sources = [checkpoint] + ([Path(probe_head)] if probe_head is not None else [])
    write_model_card(output_dir, model, sources=sources, kind=detected, task=task, command=command)
    logger.info("Saved a %s (%d parameters) to %s", type(model).__name__, model.num_parameters(), output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_matpac.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="The authors' .pt (or .safetensors) checkpoint.")
    parser.add_argument("--output_dir", required=True, help="Where to write the converted model.")
    parser.add_argument(
        "--kind",
        choices=[kind for kind in KINDS if kind != "probe_head"],  # a probe head comes as --probe_head
        help="The kind of checkpoint expected (default: read from its keys); a file of another kind is refused.",
    )
    parser.add_argument(
        "--encoder_only",
        action="store_true",
        help="Keep only the encoder of a training checkpoint or of the AudioSet classifier (a `MatpacModel`).",
    )
    parser.add_argument(
        "--probe_head", help="A released downstream probe (`probe.weight`, `probe.bias`) to put on the encoder."
    )
    parser.add_argument("--task", choices=PROBE_TASKS, help="The task of --probe_head, which names its outputs.")
    parser.add_argument("--num_attention_heads", type=int, help="Encoder heads (default: hidden size / 64).")
    parser.add_argument("--predictor_num_attention_heads", type=int, help="Predictor heads (default: width / 32).")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Write into an --output_dir that is not empty."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            encoder_only=True if args.encoder_only else None,
            num_attention_heads=args.num_attention_heads,
            predictor_num_attention_heads=args.predictor_num_attention_heads,
            kind=args.kind,
            probe_head=args.probe_head,
            task=args.task,
            overwrite=args.overwrite_output_dir,
        )
    except (FileNotFoundError, ValueError) as error:  # one line, with argparse's status: the usage is not the problem
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
