"""Pre-training MATPAC: audio sources and their sharding, the log-mel cache, the built-in corpus and the trainer."""

from .corpus import generate_builtin_corpus
from .data import MatpacPretrainingDataset, collate_pretraining_batch, list_audio_files, load_audio_source
from .logmel_cache import LogMelCache, MatpacLogMelCacheDataset, preprocess_to_cache
from .trainer import BatchTooLargeError, MatpacTrainer, NonFiniteTrainingError


__all__ = [
    "BatchTooLargeError",
    "LogMelCache",
    "MatpacLogMelCacheDataset",
    "MatpacPretrainingDataset",
    "MatpacTrainer",
    "NonFiniteTrainingError",
    "collate_pretraining_batch",
    "generate_builtin_corpus",
    "list_audio_files",
    "load_audio_source",
    "preprocess_to_cache",
]
