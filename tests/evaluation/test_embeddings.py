"""Embedding extraction and its cache, with a tiny random MATPAC encoder."""

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_HEADS, FIXTURES
from safetensors.torch import load_file
from test_tasks import make_task, save_tiny_matpac, write_clip

from modeling_matpac import MatpacFeatureExtractor, MatpacModel
from modeling_matpac.atomic_write import replace_when_written
from modeling_matpac.convert import convert_checkpoint
from modeling_matpac.evaluation import embeddings as embeddings_module
from modeling_matpac.evaluation.embeddings import (
    EmbeddingExtractor,
    authors_layer_results,
    load_or_extract,
    parse_layer,
)
from modeling_matpac.evaluation.report import write_results
from modeling_matpac.evaluation.tasks import load_task


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_matpac(tmp_path_factory.mktemp("tiny-matpac"))


@pytest.fixture(scope="module")
def us8k(tmp_path_factory):
    """30 clips of 0.4, 0.5 and 0.6 s: batches mix lengths."""
    return load_task("us8k", make_task("us8k", tmp_path_factory.mktemp("UrbanSound8K")))


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    original = MatpacModel.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MatpacModel, "forward", counting_forward)
    return calls


def reference_embedding(model_dir, waveform: np.ndarray) -> torch.Tensor:
    """The clip alone through the feature extractor and the model: the paper's embedding by definition."""
    model = MatpacModel.from_pretrained(model_dir).eval()
    features = MatpacFeatureExtractor()(waveform, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model(**features, output_hidden_states=True)


@pytest.mark.parametrize("layer", ["last", "1", "all"])
def test_embeddings_do_not_depend_on_batching(tiny_model, us8k, layer):
    """
    Batches of 7 mix 0.4, 0.5 and 0.6 s clips: the shorter ones are padded, and every layer's time mean must skip the
    padded steps. Clip 4 (0.5 s) is checked against itself alone through the model, averaged here.
    """
    one_by_one, positions = EmbeddingExtractor(tiny_model, layer=layer, batch_size=1)(us8k)
    batched, batched_positions = EmbeddingExtractor(tiny_model, layer=layer, batch_size=7)(us8k)
    np.testing.assert_array_equal(positions, np.arange(30))
    np.testing.assert_array_equal(batched_positions, positions)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    outputs = reference_embedding(tiny_model, us8k.audio[4][0])
    assert bool(outputs.time_mask.all())  # alone, the clip has no padded step: a plain mean is its embedding
    block1, last = outputs.hidden_states[1].mean(1)[0], outputs.last_hidden_state.mean(1)[0]
    expected = {"last": outputs.pooler_output[0], "1": block1, "all": (block1 + last) / 2}[layer]
    np.testing.assert_allclose(batched[4], expected.numpy(), atol=1e-5)


def test_layers(tiny_model, us8k):
    clip = us8k.select(np.array([5]))
    outputs = reference_embedding(tiny_model, clip.audio[0][0])
    block1 = outputs.hidden_states[1].mean(1)[0]  # one clip: every time step is valid
    last = outputs.last_hidden_state.mean(1)[0]
    embeddings = {
        layer: EmbeddingExtractor(tiny_model, layer=layer)(clip)[0][0] for layer in ("1", "2", "last", "all")
    }
    np.testing.assert_allclose(embeddings["1"], block1.numpy(), atol=1e-5)
    np.testing.assert_allclose(embeddings["2"], last.numpy(), atol=1e-5)  # the last block after the final norm
    np.testing.assert_allclose(embeddings["last"], last.numpy(), atol=1e-5)
    np.testing.assert_allclose(embeddings["all"], ((block1 + last) / 2).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="past the model's 2 blocks"):
        EmbeddingExtractor(tiny_model, layer=3)(clip)


@pytest.mark.parametrize("clip", ["a", "c"])
def test_authors_layer_results_layout_matches_their_code(tmp_path, clip):
    """Their `layer_results`: blocks 1..L-1 raw, then the normalised last block; ours shifted by the embeddings."""
    convert_checkpoint(
        FIXTURES / "inference_checkpoint.pt", tmp_path, num_attention_heads=FIXTURE_HEADS["num_attention_heads"]
    )
    reference = load_file(FIXTURES / "inference.safetensors")
    features = MatpacFeatureExtractor()(reference[f"{clip}.wav"], sampling_rate=16000, return_tensors="pt")
    model = MatpacModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        outputs = model(**features, output_hidden_states=True)
    frames, pooled = authors_layer_results(outputs), authors_layer_results(outputs, pooled=True)
    assert frames.shape == reference[f"{clip}.precise.frames.layer_results"].shape  # (batch, 3 blocks, steps, 320)
    assert torch.equal(frames[:, 0], outputs.hidden_states[1]) and torch.equal(
        frames[:, -1], outputs.last_hidden_state
    )
    errors = {
        "frames": (frames - reference[f"{clip}.precise.frames.layer_results"]).abs().max().item(),
        "pooled": (pooled - reference[f"{clip}.precise.pooled.layer_results"]).abs().max().item(),
    }
    extractor = EmbeddingExtractor(str(tmp_path), layer=2, device="cpu")  # the probe's --layer uses their numbering
    errors["extractor_layer_2"] = (
        (extractor.embed(features) - reference[f"{clip}.precise.pooled.layer_results"][:, 1]).abs().max().item()
    )
    print(clip, {name: f"{error:.1e}" for name, error in errors.items()})
    assert max(errors.values()) <= 1e-4
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        authors_layer_results(model(**features))


def test_parse_layer_rejects_nonsense():
    assert parse_layer(None) == "last" and parse_layer("all") == "all" and parse_layer("3") == 3
    with pytest.raises(ValueError, match="must be 'last', 'all' or a block number"):
        parse_layer("middle")
    with pytest.raises(ValueError, match="start at 1"):
        parse_layer(0)


def test_cache_is_reused_without_running_the_model(tiny_model, us8k, tmp_path, forward_calls):
    extractor = EmbeddingExtractor(tiny_model, batch_size=8)
    first = load_or_extract(us8k, extractor, tmp_path)
    assert not first.cached and len(forward_calls) == 4  # 30 clips in batches of 8
    assert len(list(tmp_path.glob("us8k-*.npz"))) == 1

    fresh = EmbeddingExtractor(tiny_model, batch_size=8)  # a new run: nothing loaded in memory
    second = load_or_extract(us8k, fresh, tmp_path)
    assert second.cached and len(forward_calls) == 4 and fresh._model is None
    np.testing.assert_array_equal(second.values, first.values)
    assert second.seconds == pytest.approx(first.seconds)

    load_or_extract(us8k, EmbeddingExtractor(tiny_model, layer="all", batch_size=30), tmp_path)  # other layer: a miss
    assert len(forward_calls) == 5 and len(list(tmp_path.glob("us8k-*.npz"))) == 2
    load_or_extract(us8k.select(np.arange(10)), extractor, tmp_path)  # other clips: a miss
    assert len(forward_calls) == 7


def test_a_stopped_extraction_resumes_at_the_block_it_was_in(tiny_model, us8k, tmp_path, monkeypatch):
    """30 clips in blocks of 8: the run stops in the third block, the next one encodes only the last two blocks."""
    reference = load_or_extract(us8k, EmbeddingExtractor(tiny_model, batch_size=8), tmp_path / "whole")
    monkeypatch.setattr(embeddings_module, "EXTRACTION_BLOCK_CLIPS", 8)
    encoded = []

    class StoppedExtractor(EmbeddingExtractor):
        def __call__(self, data):
            if self.stop_at_clip is not None and len(encoded) == self.stop_at_clip:
                raise KeyboardInterrupt
            encoded.extend(data.ids)
            return super().__call__(data)

    extractor = StoppedExtractor(tiny_model, batch_size=8)
    extractor.stop_at_clip = 16
    with pytest.raises(KeyboardInterrupt):
        load_or_extract(us8k, extractor, tmp_path / "blocks")
    assert encoded == us8k.ids[:16]
    assert sorted(path.name.split(".")[-2] for path in (tmp_path / "blocks").glob("us8k-*.npz")) == [
        "block0",
        "block1",
    ]

    extractor.stop_at_clip = None
    resumed = load_or_extract(us8k, extractor, tmp_path / "blocks")
    assert encoded == us8k.ids  # the first two blocks were read back, the last two encoded
    assert not resumed.cached and [path.name for path in (tmp_path / "blocks").iterdir()] == [
        next((tmp_path / "whole").iterdir()).name
    ]
    np.testing.assert_array_equal(resumed.positions, np.arange(30))
    np.testing.assert_allclose(resumed.values, reference.values, atol=1e-5)
    assert load_or_extract(us8k, extractor, tmp_path / "blocks").cached and encoded == us8k.ids


def test_retrained_model_invalidates_the_cache(tmp_path, us8k):
    model_dir = save_tiny_matpac(tmp_path / "model", seed=0)
    key = EmbeddingExtractor(model_dir).cache_key(us8k)
    save_tiny_matpac(model_dir, seed=1)
    assert EmbeddingExtractor(model_dir).cache_key(us8k) != key


def test_files_written_beside_the_model_keep_the_cache(tmp_path, us8k):
    """Before: results, caches or a card written into the model folder changed the key: every rerun encoded again."""
    model_dir = save_tiny_matpac(tmp_path / "model", seed=0)
    key = EmbeddingExtractor(model_dir).cache_key(us8k)
    load_or_extract(us8k, EmbeddingExtractor(model_dir), model_dir)  # --cache_dir at the model folder
    write_results([], model_dir, settings={})  # --output_dir at the model folder
    (Path(model_dir) / "README.md").write_text("a card")
    assert EmbeddingExtractor(model_dir).cache_key(us8k) == key
    assert load_or_extract(us8k, EmbeddingExtractor(model_dir), model_dir).cached


def test_runs_writing_one_file_at_once_each_replace_it_whole(tmp_path):
    """Before: runs sharing a cache wrote the same temporary name, and one renamed the other's file away (a crash)."""
    path = tmp_path / "esc50-key.npz"
    with replace_when_written(path) as first, replace_when_written(path) as second:
        np.savez(first, values=np.zeros(3))
        np.savez(second, values=np.ones(3))
    np.testing.assert_array_equal(np.load(path)["values"], np.zeros(3))  # the first run's rename came last
    with pytest.raises(OSError, match="No space left"), replace_when_written(path) as partial:
        partial.write_bytes(b"half a fi")
        raise OSError("No space left on device")
    assert sorted(tmp_path.iterdir()) == [path]  # neither partial file is left, and the whole file stays


def test_changed_or_repaired_audio_invalidates_the_cache(tiny_model, tmp_path):
    """Before: the key held the clip ids only, so a rerun after the audio changed reused the old embeddings."""
    import datasets

    from modeling_matpac.evaluation.tasks import HubAudio

    root = make_task("esc50", tmp_path / "esc50")
    extractor = EmbeddingExtractor(tiny_model)
    key = extractor.cache_key(load_task("esc50", root))
    clip = root / "audio/2-1021-A-1.wav"
    write_clip(clip, 30)  # another sound under the same name
    assert extractor.cache_key(load_task("esc50", root)) != key

    # A Hub copy whose rows were reordered: the same ids (row positions), another dataset fingerprint.
    def hub_data(names):
        table = datasets.Dataset.from_dict({"audio": [str(root / "audio" / name) for name in names]})
        data = load_task("esc50", root).select(np.arange(len(names)))
        return replace(data, audio=HubAudio(table.cast_column("audio", datasets.Audio())), ids=["row 0", "row 1"])

    names = ["2-1021-A-1.wav", "1-100038-A-14.wav"]
    assert extractor.cache_key(hub_data(names)) == extractor.cache_key(hub_data(names))
    assert extractor.cache_key(hub_data(names)) != extractor.cache_key(hub_data(names[::-1]))


def test_changed_code_invalidates_the_cache(tiny_model, tmp_path, monkeypatch):
    """Before: the key held the model folder's copy of the code, which never runs: edited code hit the cache."""
    import modeling_matpac.evaluation.embeddings as embeddings_module

    root = make_task("esc50", tmp_path / "esc50")
    extractor = EmbeddingExtractor(tiny_model)
    key = extractor.cache_key(load_task("esc50", root))
    package = tmp_path / "package"
    (package / "evaluation").mkdir(parents=True)
    sources = Path(embeddings_module.__file__).resolve().parents[1]
    for source in [*sources.glob("*.py"), *sources.glob("evaluation/*.py")]:
        (package / source.relative_to(sources)).write_bytes(source.read_bytes())
    monkeypatch.setattr(embeddings_module, "__file__", str(package / "evaluation" / "embeddings.py"))
    assert extractor.cache_key(load_task("esc50", root)) == key  # the same code
    keys = {key}
    for edited in ("modeling_matpac.py", "audio.py", "evaluation/embeddings.py"):
        with (package / edited).open("a") as file:
            file.write("\n# an edit\n")
        keys.add(extractor.cache_key(load_task("esc50", root)))
    assert len(keys) == 4


def test_corrupt_and_too_short_clips_are_skipped(tiny_model, tmp_path, caplog):
    root = make_task("esc50", tmp_path / "esc50")
    (root / "audio/2-1021-A-1.wav").write_bytes(b"RIFF\x00\x00 definitely not audio")
    write_clip(root / "audio/4-1050-A-10.wav", 10, seconds=0.01)  # less than one 25 ms analysis window
    data = load_task("esc50", root)
    caplog.set_level(logging.WARNING)
    embeddings, positions = EmbeddingExtractor(tiny_model, batch_size=4)(data)
    assert len(positions) == len(data) - 2 == embeddings.shape[0]
    assert [data.ids[i] for i in sorted(set(range(len(data))) - set(positions))] == [
        "2-1021-A-1.wav",
        "4-1050-A-10.wav",
    ]
    assert "skipped clip 2-1021-A-1.wav: cannot decode" in caplog.text
    assert "skipped clip 4-1050-A-10.wav: Clip 0 has 160 samples" in caplog.text
    assert "shorter than one analysis window" in caplog.text


def test_a_missing_model_gives_a_clear_error(us8k, tmp_path):
    with pytest.raises(ValueError, match="Cannot load the model .*run_pretraining.py"):
        EmbeddingExtractor(str(tmp_path / "no-model"))(us8k)
    (tmp_path / "config.json").write_text("{}")  # before: torch's UnpicklingError, suggesting weights_only=False
    with pytest.raises(
        ValueError, match=f"config.json is a file: pass the folder that holds the saved model, {tmp_path}"
    ):
        EmbeddingExtractor(str(tmp_path / "config.json"))(us8k)


def test_any_automodel_with_a_pooler_output(tmp_path, us8k):
    """A non-MATPAC encoder (a tiny random AST) is probed through its own feature extractor and pooler_output."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_mel_bins=32,
        max_length=64,
    )
    model, feature_extractor = ASTModel(config).eval(), ASTFeatureExtractor(num_mel_bins=32, max_length=64)
    model.save_pretrained(tmp_path)
    feature_extractor.save_pretrained(tmp_path)
    clips = us8k.select(np.array([0, 1, 2]))
    embeddings, _ = EmbeddingExtractor(str(tmp_path), batch_size=2)(clips)
    with torch.no_grad():
        expected = model(
            **feature_extractor(clips.audio[1][0], sampling_rate=16000, return_tensors="pt")
        ).pooler_output
    np.testing.assert_allclose(embeddings[1], expected[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="--layer all needs a MATPAC model"):
        EmbeddingExtractor(str(tmp_path), layer="all")(clips)


def test_an_unreadable_or_inconsistent_cache_is_encoded_again(tiny_model, us8k, tmp_path, forward_calls, caplog):
    """A truncated file, an empty one and positions that are not one increasing clip per value are misses, warned."""
    extractor = EmbeddingExtractor(tiny_model, batch_size=8)
    reference = load_or_extract(us8k, extractor, tmp_path)
    (path,) = tmp_path.glob("us8k-*.npz")
    key = extractor.cache_key(us8k)
    damaged = {
        "truncated": lambda: path.write_bytes(path.read_bytes()[:2000]),
        "empty": lambda: path.write_bytes(b""),
        "reversed positions": lambda: np.savez(
            path, key=key, values=reference.values, positions=reference.positions[::-1], seconds=1.0
        ),
        "positions past the clips": lambda: np.savez(
            path, key=key, values=reference.values, positions=reference.positions + 1, seconds=1.0
        ),
        "fewer values": lambda: np.savez(
            path, key=key, values=reference.values[:-1], positions=reference.positions, seconds=1.0
        ),
        "repeated position": lambda: np.savez(  # clip 0 twice and the last clip lost: the lengths agree
            path, key=key, values=reference.values, positions=np.r_[0, reference.positions[:-1]], seconds=1.0
        ),
    }
    caplog.set_level(logging.WARNING)
    for name, damage in damaged.items():
        damage()
        calls = len(forward_calls)
        again = load_or_extract(us8k, extractor, tmp_path)
        assert not again.cached and len(forward_calls) == calls + 4, name
        np.testing.assert_array_equal(again.values, reference.values)
        np.testing.assert_array_equal(again.positions, np.arange(30))
    assert caplog.text.count("Unreadable embedding cache") == 2
    assert caplog.text.count("Inconsistent embedding cache") == 4
    assert load_or_extract(us8k, extractor, tmp_path).cached


def test_non_finite_embeddings_are_refused_before_the_cache(us8k, tmp_path):
    """A diverged checkpoint (NaN weights) fails with one clear message, and nothing is cached."""
    model_dir = save_tiny_matpac(tmp_path / "diverged")
    model = MatpacModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.encoder.layers[0].attention.out_proj.weight.fill_(float("nan"))
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match="non-finite embeddings for 30 of 30 clips .*diverged"):
        load_or_extract(us8k, EmbeddingExtractor(model_dir, batch_size=8), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npz"))


@pytest.mark.parametrize("damage", ["truncated weights", "another architecture"])
def test_a_model_that_cannot_load_gives_one_clear_line(us8k, tiny_model, tmp_path, damage):
    import shutil

    model_dir = shutil.copytree(tiny_model, tmp_path / "model")
    if damage == "truncated weights":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:  # the encoder's weights under a config with other sizes
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(ValueError, match="Cannot load the model") as error:
        EmbeddingExtractor(str(model_dir))(us8k)
    assert "\n" not in str(error.value)


def test_a_hub_model_is_keyed_by_the_revision_in_the_hub_cache(tmp_path, monkeypatch):
    """Before: a Hub id was keyed by its name, so a new upload under the same id reused the old embeddings."""
    import huggingface_hub

    from modeling_matpac.evaluation.embeddings import _model_fingerprint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert _model_fingerprint("someone/matpac") == {"model": "someone/matpac", "revision": None}
    assert _model_fingerprint(str(tmp_path / "no-model")) == {"model": str(tmp_path / "no-model"), "revision": None}
    repo = tmp_path / "models--someone--matpac"
    fingerprints = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        fingerprints.append(_model_fingerprint("someone/matpac"))
    assert fingerprints == [{"model": "someone/matpac", "revision": commit} for commit in ("a" * 40, "b" * 40)]
