"""
Clip embeddings of a frozen encoder for linear probing: batched extraction (GPU when there is one) and an on-disk
cache keyed by model, task, clips and settings, so that re-running a probe with other hyper-parameters re-encodes
nothing.

The clip embedding is the paper's: the encoder's time steps (5 frequency patches concatenated) averaged over the
clip's valid steps, i.e. `pooler_output`. With `layer` another block's output, or the average of all blocks, is pooled
the same way. Any `AutoModel` whose output has `pooler_output` can be probed with the default layer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoFeatureExtractor, AutoModel

from ..atomic_write import replace_when_written
from ..audio import AudioDecodeError, resample
from .tasks import ProbeData, ProbeDataError


logger = logging.getLogger(__name__)
# What loading a model folder raises for missing, foreign or truncated files, or for a file given for the folder.
MODEL_LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)

LAST_LAYER = "last"
ALL_LAYERS = "all"
# Clips per block of a long extraction: each block is saved as it ends, so a stopped run encodes again only the block
# it was in (NSynth's 306k clips take hours on CPU).
EXTRACTION_BLOCK_CLIPS = 10_000


class NoDecodableClipsError(ProbeDataError):
    """None of the clips given to the extractor could be decoded: a task's data problem, which `--all` skips."""


def parse_layer(layer: str | int | None) -> str | int:
    """`"last"` (the paper's embedding), `"all"` (mean of every block's pooled output) or a block number from 1."""
    if layer is None or str(layer) == LAST_LAYER:
        return LAST_LAYER
    if str(layer) == ALL_LAYERS:
        return ALL_LAYERS
    try:
        number = int(layer)
    except ValueError:
        raise ValueError(f"--layer must be 'last', 'all' or a block number (1, 2, ...), got {layer!r}.") from None
    if number < 1:
        raise ValueError(f"--layer block numbers start at 1, got {number}.")
    return number


def authors_layer_results(outputs, pooled: bool = False) -> torch.Tensor:
    """
    A MATPAC output's hidden states in the layout of the authors' `layer_results`, `(batch, layers, time_steps, dim)`
    or, `pooled`, `(batch, layers, dim)` averaged over the valid time steps. Theirs hold the raw output of blocks
    1..L-1 and then the last block's output after the final LayerNorm; our `hidden_states` hold the patch embeddings
    and then every block's raw output, so entry i < L-1 is `hidden_states[i + 1]` and the last is `last_hidden_state`.
    Needs `output_hidden_states=True`.
    """
    if outputs.hidden_states is None:
        raise ValueError(
            "The authors' layer results need the hidden states: call the model with output_hidden_states=True."
        )
    layers = torch.stack((*outputs.hidden_states[1:-1], outputs.last_hidden_state), dim=1)
    if not pooled:
        return layers
    weights = outputs.time_mask[:, None, :, None].to(layers.dtype)
    return (layers * weights).sum(2) / weights.sum(2).clamp(min=1)


# The files of a model folder that decide its embeddings: results, model cards or caches written beside them do not.
MODEL_FILE_PATTERNS = ("config.json", "preprocessor_config.json", "*.safetensors", "*.bin", "*.index.json", "*.py")


def _model_fingerprint(model_name_or_path: str) -> dict:
    """
    A local model is identified by its model files' names, sizes and modification times (retraining changes them), a
    Hub model by its id and the commit of the copy in the local Hub cache (a new upload under the same id changes it).
    """
    path = Path(model_name_or_path).expanduser()
    if not path.is_dir():
        try:
            cached = try_to_load_from_cache(model_name_or_path, "config.json")
        except ValueError:  # not a Hub id either: nothing cached to name
            cached = None
        return {"model": model_name_or_path, "revision": Path(cached).parent.name if isinstance(cached, str) else None}
    files = sorted(
        entry
        for entry in path.iterdir()
        if entry.is_file() and any(fnmatch.fnmatch(entry.name, pattern) for pattern in MODEL_FILE_PATTERNS)
    )
    return {
        "model": str(path.resolve()),
        "files": [[entry.name, entry.stat().st_size, entry.stat().st_mtime_ns] for entry in files],
    }


def _code_fingerprint() -> dict:
    """
    The code that computes the embeddings: this package's model unit and audio sources, and the clip reading and
    encoding here (hashed: an edited checkout counts), and the torch and transformers versions. A model folder's own
    copy of the code is not what runs.
    """
    here = Path(__file__).resolve()
    digest = hashlib.sha256()
    for path in [*sorted(here.parents[1].glob("*.py")), here.parent / "tasks.py", here]:
        digest.update(path.name.encode() + path.read_bytes())
    return {"code": digest.hexdigest(), "torch": torch.__version__, "transformers": transformers.__version__}


class _ClipDataset(torch.utils.data.Dataset):
    """Decodes clips in DataLoader workers, resampled to the feature extractor's rate; `None` for unreadable clips."""

    def __init__(self, data: ProbeData, order: np.ndarray, sampling_rate: int):
        self.data, self.order, self.sampling_rate = data, order, sampling_rate

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, item: int) -> tuple[int, torch.Tensor | None]:
        position = int(self.order[item])
        try:
            waveform, sampling_rate = self.data.audio[position]
        except AudioDecodeError as error:
            logger.warning("%s: skipped clip %s: %s", self.data.task, self.data.ids[position], error)
            return position, None
        waveform = resample(torch.from_numpy(waveform), sampling_rate, self.sampling_rate)
        return position, waveform


class _Featurize:
    """DataLoader collate: log-mel of a batch; a clip the feature extractor refuses is dropped with a warning."""

    def __init__(self, feature_extractor, task: str, ids: list[str]):
        self.feature_extractor, self.task, self.ids = feature_extractor, task, ids

    def _call(self, waveforms: list[torch.Tensor]):
        return self.feature_extractor(
            [waveform.numpy() for waveform in waveforms],
            sampling_rate=self.feature_extractor.sampling_rate,
            return_tensors="pt",
        )

    def _accepts(self, position: int, waveform: torch.Tensor) -> bool:
        try:
            self._call([waveform])
            return True
        except ValueError as error:
            logger.warning("%s: skipped clip %s: %s", self.task, self.ids[position], error)
            return False

    def __call__(self, batch: list[tuple[int, torch.Tensor | None]]):
        batch = [(position, waveform) for position, waveform in batch if waveform is not None]
        try:
            features = self._call([waveform for _, waveform in batch]) if batch else None
        except ValueError:  # find the clip(s) at fault: too short, NaN samples...
            batch = [(position, waveform) for position, waveform in batch if self._accepts(position, waveform)]
            features = self._call([waveform for _, waveform in batch]) if batch else None
        return [position for position, _ in batch], features


class EmbeddingExtractor:
    """Encodes a task's clips with a frozen model, loaded on first use only (a cache hit never loads it)."""

    def __init__(
        self,
        model_name_or_path: str,
        layer: str | int | None = LAST_LAYER,
        device: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        self.model_name_or_path = model_name_or_path
        self.layer = parse_layer(layer)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._model = None
        self._feature_extractor = None

    def _load(self) -> None:
        if Path(self.model_name_or_path).is_file():
            raise ValueError(
                f"--model_name_or_path {self.model_name_or_path} is a file: pass the folder that holds the saved "
                f"model, {Path(self.model_name_or_path).parent} (an authors' checkpoint is converted first: python -m "
                "modeling_matpac.convert)."
            )
        try:
            self._feature_extractor = AutoFeatureExtractor.from_pretrained(self.model_name_or_path)
            model = AutoModel.from_pretrained(self.model_name_or_path, dtype=torch.float32)
        except MODEL_LOAD_ERRORS as error:
            raise ValueError(
                f"Cannot load the model {self.model_name_or_path!r} ({str(error).strip().splitlines()[0]}). Pass "
                "--model_name_or_path with a saved or converted MATPAC directory (the default one is made by `python "
                "run_pretraining.py`)."
            ) from error
        if self.layer != LAST_LAYER and model.config.model_type != "matpac":
            raise ValueError(
                f"--layer {self.layer} needs a MATPAC model; {model.config.model_type} gives pooler_output only."
            )
        if self.layer not in (LAST_LAYER, ALL_LAYERS) and self.layer > model.config.num_hidden_layers:
            raise ValueError(f"--layer {self.layer} is past the model's {model.config.num_hidden_layers} blocks.")
        self._model = model.eval().requires_grad_(False).to(self.device)

    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @property
    def feature_extractor(self):
        if self._feature_extractor is None:
            self._load()
        return self._feature_extractor

    def cache_key(self, data: ProbeData) -> str:
        """
        Hash of everything the embeddings depend on: model files, the code that runs them, layer, task, data source,
        clip list and the clips' content (files' sizes and times, a dataset's fingerprint), so that changed or repaired
        audio, or changed code, is encoded again.
        """
        if self._model is None and not Path(self.model_name_or_path).expanduser().is_dir():
            self._load()  # a Hub model is fetched first, so that the key names the revision that runs
        description = {
            **_model_fingerprint(self.model_name_or_path),
            **_code_fingerprint(),
            "layer": self.layer,
            "task": data.task,
            "source": data.source,
            "clips": hashlib.sha256("\n".join(data.ids).encode()).hexdigest(),
            "audio": data.audio.signature(),
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    @torch.inference_mode()
    def embed(self, features) -> torch.Tensor:
        """`(batch, dim)` clip embeddings of a featurized batch."""
        features = features.to(self.device)
        if self.layer == LAST_LAYER:
            return self.model(**features).pooler_output
        pooled = authors_layer_results(self.model(**features, output_hidden_states=True), pooled=True)
        return pooled.mean(1) if self.layer == ALL_LAYERS else pooled[:, self.layer - 1]

    def __call__(self, data: ProbeData) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings `(n_kept, dim)` of the decodable clips and their positions in `data`, in `data`'s order."""
        durations = np.array([data.audio.duration(i) for i in range(len(data))])
        order = np.argsort(-durations, kind="stable")  # similar lengths share a batch: little padding
        loader = torch.utils.data.DataLoader(
            _ClipDataset(data, order, self.feature_extractor.sampling_rate),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_Featurize(self.feature_extractor, data.task, data.ids),
        )
        positions, embeddings = [], []
        for batch_positions, features in tqdm(loader, desc=f"Encoding {data.task}", unit="batch"):
            if features is not None:
                positions += batch_positions
                embeddings.append(self.embed(features).float().cpu())
        if not embeddings:
            raise NoDecodableClipsError(f"{data.task}: none of the {len(data)} clips could be decoded.")
        positions = np.array(positions)
        restore = np.argsort(positions)
        values, positions = torch.cat(embeddings).numpy()[restore], positions[restore]
        broken = ~np.isfinite(values).all(axis=1)
        if broken.any():  # a diverged checkpoint: refused before anything is cached or probed
            raise ValueError(
                f"{data.task}: the model gives non-finite embeddings for {broken.sum()} of {len(values)} clips (the "
                f"first: {data.ids[positions[broken][0]]}); is its checkpoint diverged?"
            )
        return values, positions


@dataclass
class Embeddings:
    """Embeddings of the clips at `positions` of the task data, and how long extracting them took."""

    values: np.ndarray
    positions: np.ndarray
    seconds: float
    cached: bool


def _read_cache(path: Path, key: str, num_clips: int) -> tuple[np.ndarray, np.ndarray, float] | None:
    """
    `(values, positions, seconds)` stored at `path` for `key`, or None. A file that cannot be read, or whose positions
    are not increasing clip positions below `num_clips`, one per embedding, is not used (with a warning): its clips
    are encoded again.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path) as cached:
            if str(cached["key"]) != key:
                return None
            values, positions, seconds = cached["values"], cached["positions"], float(cached["seconds"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("Unreadable embedding cache %s (%s): encoding its clips again.", path, error)
        return None
    consistent = (
        values.ndim == 2
        and positions.ndim == 1
        and len(values) == len(positions)
        and np.issubdtype(positions.dtype, np.integer)
        and bool(np.all(np.diff(positions) > 0))
        and (len(positions) == 0 or (positions[0] >= 0 and positions[-1] < num_clips))
    )
    if not consistent:
        logger.warning("Inconsistent embedding cache %s (values and clip positions disagree): encoding again.", path)
        return None
    return values, positions, seconds


def _write_cache(path: Path, key: str, values: np.ndarray, positions: np.ndarray, seconds: float) -> None:
    # A run killed while writing leaves no truncated cache behind, and runs that share the cache write their own files.
    with replace_when_written(path) as partial:
        np.savez(partial, key=key, values=values, positions=positions, seconds=seconds)


def load_or_extract(data: ProbeData, extractor: EmbeddingExtractor, cache_dir: str | Path) -> Embeddings:
    """
    Reads the task's embeddings from `cache_dir` or extracts and stores them (`<task>-<key>.npz`). A task of more
    than `EXTRACTION_BLOCK_CLIPS` clips is encoded in blocks, each saved as it ends (`<task>-<key>.block<k>.npz`), so
    that a run stopped midway resumes at the block it was in; the blocks are merged at the end.
    """
    key = extractor.cache_key(data)
    path = Path(cache_dir) / f"{data.task}-{key[:20]}.npz"
    cached = _read_cache(path, key, len(data))
    if cached is not None:
        logger.info("%s: using cached embeddings %s", data.task, path)
        return Embeddings(*cached, cached=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_blocks = -(-len(data) // EXTRACTION_BLOCK_CLIPS)
    block_paths = [path.with_name(f"{path.stem}.block{k}.npz") for k in range(num_blocks)] if num_blocks > 1 else []
    blocks = []
    for k in range(num_blocks):
        start = k * EXTRACTION_BLOCK_CLIPS
        block = _read_cache(block_paths[k], key, len(data)) if block_paths else None
        if block is not None:
            logger.info("%s: block %d of %d read from %s", data.task, k + 1, num_blocks, block_paths[k])
            blocks.append(block)
            continue
        subset = data.select(np.arange(start, min(start + EXTRACTION_BLOCK_CLIPS, len(data)))) if block_paths else data
        begin = time.perf_counter()
        try:
            values, positions = extractor(subset)
        except NoDecodableClipsError:
            if not block_paths:
                raise
            continue  # not saved: a resumed run tries this block again
        blocks.append((values, positions + start, time.perf_counter() - begin))
        if block_paths:
            _write_cache(block_paths[k], key, *blocks[-1])
    if not blocks:
        raise NoDecodableClipsError(f"{data.task}: none of the {len(data)} clips could be decoded.")
    values = np.concatenate([block[0] for block in blocks])
    positions = np.concatenate([block[1] for block in blocks])
    seconds = sum(block[2] for block in blocks)
    logger.info(
        "%s: encoded %d clips in %.1f s (%.2f clips/s)", data.task, len(positions), seconds, len(positions) / seconds
    )
    _write_cache(path, key, values, positions, seconds)
    for block_path in block_paths:
        block_path.unlink(missing_ok=True)
    return Embeddings(values, positions, seconds, cached=False)
