"""The model card the converter writes beside a converted checkpoint: what it is, its source, how it was made."""

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .labels import LABEL_MAPS
from .modeling_matpac import MatpacForAudioClassification, MatpacForPreTraining, MatpacPreTrainedModel


AUTHORS_REPOSITORY = "https://github.com/aurianworld/matpac"
FINE_TUNED_ON_AUDIOSET = ("the MATPAC++ encoder (ViT-B) fine-tuned on AudioSet with 9.92 s inputs", 992)
# The authors' release files (their inference README): what each holds and its chunk length in frames. Other files,
# and files named like a release whose weights have another chunk length, are described by their kind.
RELEASE_FILES = {
    "matpac_10_2048.pt": (
        "the MATPAC encoder (ViT-B) pre-trained without labels on AudioSet (n_tau 10, 2048 classes)",
        608,
    ),
    "matpac_plus_6s_2048_enconly.pt": ("the MATPAC++ encoder (ViT-B) pre-trained without labels on AudioSet", 608),
    "matpac_plus_music_6s_2048_enconly.pt": ("the MATPAC++ encoder (ViT-B) pre-trained without labels on music", 608),
    "matpac_plus_as_48_1_map_enconly.pt": FINE_TUNED_ON_AUDIOSET,
    "matpac_plus_as_48_1_map_enc_and_head.pt": FINE_TUNED_ON_AUDIOSET,
}
KIND_DESCRIPTIONS = {
    "encoder": "a MATPAC encoder of the authors",
    "audioset_classifier": "a MATPAC encoder of the authors fine-tuned on AudioSet",
    "pretraining": "a MATPAC training state of the authors",
}
LABEL_TERMS = {
    "audioset": "AudioSet ontology names (Google), CC BY-SA 4.0",
    "esc50": "ESC-50 class names (K. J. Piczak), CC BY-NC 3.0",
    "fsd50k": "FSD50K vocabulary (MTG, Universitat Pompeu Fabra), CC BY 4.0",
    "openmic": "OpenMIC-2018 instrument names (Spotify, NYU MARL), CC BY 4.0",
}
CITATION = """@inproceedings{quelennec2025matpac,
  title={Masked Latent Prediction and Classification for Self-Supervised Audio Representation Learning},
  author={Quelennec, Aurian and Chouteau, Pierre and Peeters, Geoffroy and Essid, Slim},
  booktitle={ICASSP 2025 - 2025 IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year={2025},
  doi={10.1109/ICASSP49660.2025.10887666}
}"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matpac_version() -> str:
    try:
        return version("matpac")
    except PackageNotFoundError:  # run from a source checkout
        return "source checkout"


def _what(model: MatpacPreTrainedModel, source: str, kind: str, task: str | None) -> str:
    """One sentence on what the converted model is."""
    release, num_frames = RELEASE_FILES.get(source, (None, None))
    what = release if num_frames == model.config.num_frames else KIND_DESCRIPTIONS[kind]
    if task is not None:
        return f"{what}, with the authors' linear probe for {LABEL_MAPS[task].title} on its clip embedding"
    if kind == "audioset_classifier":
        if isinstance(model, MatpacForAudioClassification):
            return f"{what}, with its {model.config.num_labels}-class AudioSet classifier"
        return f"{what} (its AudioSet classifier left out)"
    if kind == "pretraining" and not isinstance(model, MatpacForPreTraining):
        return f"{what} (the student encoder only)"
    return what


def _head_description(model: MatpacPreTrainedModel, task: str | None) -> list[str]:
    if not isinstance(model, MatpacForAudioClassification):
        return []
    config = model.config
    pooling = (
        f"the mean over the {config.num_frequency_patches} frequency patches of each time step "
        f"({config.hidden_size}-d), averaged over time"
        if config.classifier_pooling == "frequency_mean"
        else f"`pooler_output`, the time mean of the {config.embedding_size}-d time-step embeddings"
    )
    scores = "sigmoid (multi-label)" if config.problem_type == "multi_label_classification" else "softmax"
    lines = [
        f"- **Head:** clip embedding = {pooling}"
        + (", standardised by a non-affine BatchNorm (running statistics)" if config.classifier_batch_norm else "")
        + f', then a linear layer to {config.num_labels} classes (`classifier_pooling="{config.classifier_pooling}"`,'
        f" `classifier_batch_norm={config.classifier_batch_norm}`).",
        f'- **Scores:** `problem_type="{config.problem_type}"`: `pipeline("audio-classification")` applies a '
        f"{scores}. The authors' inference code (`probe_forward`) reports a softmax over all classes for every head; "
        "`logits.softmax(-1)` gives it.",
        f"- **Labels:** `id2label` in the authors' output order, from `modeling_matpac/label_maps/"
        f"{LABEL_MAPS[task or 'audioset'].file}`"
        + (" (the AudioSet class list sorted by `mid`)." if task is None else "."),
    ]
    return lines


def model_card(model: MatpacPreTrainedModel, sources: list[Path], kind: str, task: str | None, command: str) -> str:
    """The card's Markdown, Hub metadata included."""
    config = model.config
    classifier = isinstance(model, MatpacForAudioClassification)
    source = sources[0].name
    what = _what(model, source, kind, task)
    label_task = task or ("audioset" if classifier else None)
    tags = "\n".join(
        f"- {tag}" for tag in ["audio", "matpac", "audio-classification" if classifier else "feature-extraction"]
    )
    files = "\n".join(f"  - `{path.name}`, sha256 `{_sha256(path)}`" for path in sources)
    terms = LABEL_TERMS.get(label_task, "MTG-Jamendo tags (MTG, Universitat Pompeu Fabra), CC BY-NC-SA 4.0")
    label_terms = f" The class names are the {terms}; credit the dataset when you reuse them." if label_task else ""
    layers = config.num_hidden_layers
    usage = (
        """```python
import modeling_matpac  # or pass trust_remote_code=True
from transformers import pipeline

tagger = pipeline("audio-classification", model="{path}")
tagger("clip.wav", top_k=5)  # [{"label": ..., "score": ...}, ...]
```"""
        if classifier
        else """```python
import modeling_matpac  # or pass trust_remote_code=True
from modeling_matpac.audio import decode_mono_16k
from transformers import AutoFeatureExtractor, AutoModel

feature_extractor = AutoFeatureExtractor.from_pretrained("{path}")
model = AutoModel.from_pretrained("{path}")
waveform = decode_mono_16k("clip.wav").numpy()  # mono, 16 kHz
embedding = model(**feature_extractor(waveform, sampling_rate=16000, return_tensors="pt")).pooler_output
```"""
    )
    body = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'audio-classification' if classifier else 'feature-extraction'}",
        "tags:",
        tags,
        "---",
        "",
        f"# {source.rsplit('.', 1)[0]} ({type(model).__name__})",
        "",
        f"This is {what}, converted for 🤗 Transformers by the `matpac` package. The weights are the authors' "
        f"(Quelennec, Chouteau, Peeters and Essid), unchanged.",
        "",
        "## Model description",
        "",
        f"- **Class:** `{type(model).__name__}` (`{model.num_parameters():,}` parameters).",
        f"- **Input:** mono audio at {config.sampling_rate} Hz as a normalised log-mel of {config.num_mel_bins} bands "
        "(the saved feature extractor computes it); any length, encoded in chunks of "
        f"{config.num_frames} frames ({config.num_frames / 100:.2f} s, `num_frames={config.num_frames}`), "
        'the authors\' "precise" mode.',
        f"- **Encoder:** ViT, {layers} blocks, width {config.hidden_size}, {config.num_attention_heads} heads, "
        f"{config.patch_size}x{config.patch_size} patches; `last_hidden_state` is one {config.embedding_size}-d "
        "vector per 16-frame time step (frequency patches concatenated), `pooler_output` their mean.",
        *_head_description(model, task),
        "",
        "## Hidden states and the authors' `layer_results`",
        "",
        f"`output_hidden_states=True` returns {layers + 1} tensors: the patch embeddings, then the raw output of "
        f"blocks 1..{layers}. The authors' `layer_results` has {layers} entries: the raw outputs of blocks "
        f"1..{layers - 1} (`hidden_states[1:{layers}]`), then the last block's output after the final LayerNorm "
        "(`last_hidden_state`). `modeling_matpac.evaluation.embeddings.authors_layer_results` returns that layout.",
        "",
        "## Source",
        "",
        f"- **Authors' code and release:** {AUTHORS_REPOSITORY} (files on its releases page).",
        "- **Converted from:**",
        files,
        "",
        "## Conversion",
        "",
        f"Made with `matpac` {_matpac_version()}:",
        "",
        "```bash",
        command,
        "```",
        "",
        "The converter reads the kind of file and every size from the tensor names and shapes, renames the "
        "authors' keys (`student_encoder.blocks.{i}` -> `matpac.encoder.layers.{i}`, `head_norm` -> "
        "`embedding_norm`, `head` / `probe` -> `classifier`, ...) and refuses unknown, missing or misshaped "
        "tensors; the front end's torchaudio buffers, if present, are recomputed by the feature extractor instead. "
        "The `matpac` tests check conversions of the authors' reference outputs (tiny random models with the "
        "release files' key layout) to 1e-4.",
        "",
        "## How to use",
        "",
        usage,
        "",
        "## Licence",
        "",
        f"The authors' repository states no licence for its code or weights.{label_terms}",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(body)


def write_model_card(
    output_dir: Path, model: MatpacPreTrainedModel, sources: list[Path], kind: str, task: str | None, command: str
) -> Path:
    """Writes `README.md` (the Hub's model card) into the converted directory; `kind` is the source file's."""
    path = Path(output_dir) / "README.md"
    card = model_card(model, sources, kind, task, command)
    path.write_text(card.replace("{path}", str(output_dir)), encoding="utf-8")
    return path
