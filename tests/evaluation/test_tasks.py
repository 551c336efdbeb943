"""
Task loaders on small fake copies of each dataset's original layout: the builders below write a few generated clips
per class with the official file names, CSVs and split lists (they are shared with the other probing tests).
"""

import csv
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from modeling_matpac.audio import AudioDecodeError, read_mono
from modeling_matpac.evaluation.tasks import (
    ESC50_CLASSES,
    GTZAN_GENRES,
    PAPER_TASKS,
    AudioFiles,
    ProbeData,
    ProbeDataError,
    check_clip_counts,
    clip_counts,
    find_task_dir,
    load_task,
)


def write_clip(path: Path, label_index: int, seconds: float = 0.5, sampling_rate: int = 16000, seed: int = 0):
    """A tone whose pitch depends on the class, plus a little noise: classes are separable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * (label_index + 1) * t) + noise).astype(np.float32), sampling_rate)


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",", quoting=csv.QUOTE_MINIMAL):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter, quoting=quoting)
        writer.writerow(header)
        writer.writerows(rows)


ESC50_FAKE = {"dog": 0, "rooster": 1, "rain": 10}  # category: ESC-50's own `target`, not alphabetical


def make_esc50(root: Path) -> Path:
    """meta/esc50.csv + audio/, 5 folds x 3 classes x 1 clip at 44.1 kHz (as the real data)."""
    rows = []
    for fold in range(1, 6):
        for category, target in ESC50_FAKE.items():
            name = f"{fold}-{1000 + 10 * fold + target}-A-{target}.wav"
            write_clip(root / "audio" / name, target, sampling_rate=44100, seed=fold)
            rows.append([name, fold, target, category, "False", 1000 + 10 * fold + target, "A"])
    write_csv(root / "meta/esc50.csv", ["filename", "fold", "target", "category", "esc10", "src_file", "take"], rows)
    return root


US8K_FAKE = ["dog_bark", "siren", "street_music"]


def make_us8k(root: Path) -> Path:
    """metadata/UrbanSound8K.csv + audio/fold<N>/, 10 folds x 3 classes, clips of different lengths."""
    from modeling_matpac.evaluation.tasks import US8K_CLASSES

    rows = []
    for fold in range(1, 11):
        for index, name in enumerate(US8K_FAKE):
            class_id = US8K_CLASSES.index(name)
            file_name = f"{100 + fold}-{class_id}-0-{index}.wav"
            write_clip(root / f"audio/fold{fold}" / file_name, index, seconds=0.4 + 0.1 * index, seed=fold)
            rows.append([file_name, 100 + fold, 0.0, 1.0, 1, fold, class_id, name])
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    write_csv(root / "metadata/UrbanSound8K.csv", header, rows)
    return root


GTZAN_FAKE = {"train": [0, 1, 2, 3], "valid": [4, 5], "test": [6, 7]}


def make_gtzan(root: Path, genres=("blues", "jazz", "rock")) -> Path:
    """genres/<genre>/<genre>.000NN.wav + {train,valid,test}_filtered.txt; clip 8 of each genre is in no list."""
    for index, genre in enumerate(genres):
        for number in range(9):
            write_clip(root / f"genres/{genre}/{genre}.{number:05d}.wav", index, sampling_rate=22050, seed=number)
    for split, numbers in GTZAN_FAKE.items():
        lines = [f"{genre}/{genre}.{number:05d}.wav" for genre in genres for number in numbers]
        (root / f"{split}_filtered.txt").write_text("\n".join(lines) + "\n")
    return root


NSYNTH_FAKE = {"train": 4, "valid": 2, "test": 2}


def make_nsynth(root: Path, families=("bass", "guitar", "organ")) -> Path:
    """nsynth-{split}/examples.json + audio/<note_str>.wav; as in the real data, no note is in two splits."""
    for offset, (split, count) in enumerate(NSYNTH_FAKE.items()):
        examples = {}
        for index, family in enumerate(families):
            for number in range(count):
                note = f"{family}_acoustic_{10 * offset + number:03d}-0{60 + number}-100"
                write_clip(root / f"nsynth-{split}/audio/{note}.wav", index, seed=number)
                examples[note] = {"note_str": note, "instrument_family_str": family, "instrument_family": index}
        (root / f"nsynth-{split}/examples.json").write_text(json.dumps(examples))
    return root


OPENMIC_CLASSES = ["voice", "guitar", "piano"]  # the columns of Y_true: not alphabetical, unlike the official map


def make_openmic(root: Path, num_clips: int = 24) -> Path:
    """openmic-2018.npz (partial labels), class-map.json, partitions/split01_{train,test}.csv, audio/<key[:3]>/."""
    rng = np.random.default_rng(0)
    keys = np.array([f"{100000 + 7 * i:06d}_{3840 * (i % 3)}" for i in range(num_clips)], dtype=object)  # as released
    y_mask = rng.random((num_clips, 3)) < 0.7
    y_mask[:, 0] = True  # every clip has at least one annotated class
    y_true = np.where(y_mask, rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(num_clips, 3)), 0.5)
    y_true[:2, :] = 1.0  # every class has annotated positives in the training part
    y_true[-2:, :] = 1.0  # ... and in the test part
    y_mask[:2, :] = y_mask[-2:, :] = True
    y_true[2], y_mask[2] = [1.0, 0.0, 0.0], True  # annotated for all classes, a positive of the first column only
    np.savez(
        root / "openmic-2018.npz",
        X=np.zeros((num_clips, 10, 128), np.uint8),
        Y_true=y_true,
        Y_mask=y_mask,
        sample_key=keys,
    )
    (root / "class-map.json").write_text(json.dumps({name: i for i, name in enumerate(OPENMIC_CLASSES)}))
    (root / "partitions").mkdir()
    (root / "partitions/split01_train.csv").write_text("\n".join(keys[: num_clips * 2 // 3]) + "\n")
    (root / "partitions/split01_test.csv").write_text("\n".join(keys[num_clips * 2 // 3 :]) + "\n")
    for i, key in enumerate(keys):
        write_clip(root / "audio" / key[:3] / f"{key}.ogg", int(np.argmax(y_true[i])), seed=i)
    return root


MTT_TAGS = ["guitar", "classical", "slow"]


def make_mtt(root: Path, num_clips: int = 18) -> Path:
    """annotations_final.csv (tab-separated, quoted, with tags outside the top 50), mp3/<hex>/*.mp3, split/*.npy."""
    all_tags = ["no voice", *MTT_TAGS, "techno"]
    rng = np.random.default_rng(1)
    rows, paths = [], []
    for clip in range(num_clips):
        path = f"{'0123456789abcdef'[clip % 16]}/artist{clip}-album-{clip:02d}-song-30-59.mp3"
        tags = (rng.random(len(all_tags)) < 0.4).astype(int)
        tags[1 + clip % 3] = 1  # every top tag has positives in every split
        write_clip(root / "mp3" / path, int(np.argmax(tags[1:4])), seed=clip)
        rows.append([clip * 2, *tags, path])
        paths.append(path)
    write_csv(root / "annotations_final.csv", ["clip_id", *all_tags, "mp3_path"], rows, "\t", csv.QUOTE_ALL)
    (root / "split").mkdir()
    np.save(root / "split/tags.npy", np.array(MTT_TAGS))
    for split, part in (("train", slice(0, 12)), ("valid", slice(12, 15)), ("test", slice(15, 18))):
        np.save(root / f"split/{split}.npy", np.array([f"{i}\t{paths[i]}" for i in range(num_clips)][part]))
    return root


FSD50K_VOCABULARY = ["Bark", "Guitar", "Speech", "Wind"]


def make_fsd50k(root: Path) -> Path:
    """FSD50K.ground_truth/{dev,eval,vocabulary}.csv + FSD50K.{dev,eval}_audio/<fname>.wav."""
    (root / "FSD50K.ground_truth").mkdir(parents=True)
    with open(root / "FSD50K.ground_truth/vocabulary.csv", "w") as handle:
        handle.writelines(f"{i},{name},/m/{i:04d}\n" for i, name in enumerate(FSD50K_VOCABULARY))
    label_sets = ["Bark", "Guitar,Speech", "Speech", "Wind,Bark", "Guitar"]
    dev, evaluation = [], []
    for clip in range(20):
        labels = label_sets[clip % len(label_sets)]
        split = "val" if clip % 5 == 4 or clip in (3, 13) else "train"
        write_clip(root / f"FSD50K.dev_audio/{1000 + clip}.wav", clip % 4, seconds=0.3 + 0.05 * (clip % 6), seed=clip)
        dev.append([1000 + clip, labels, "", split])
    for clip in range(10):
        write_clip(root / f"FSD50K.eval_audio/{5000 + clip}.wav", clip % 4, seed=clip)
        evaluation.append([5000 + clip, label_sets[clip % len(label_sets)], ""])
    write_csv(root / "FSD50K.ground_truth/dev.csv", ["fname", "labels", "mids", "split"], dev)
    write_csv(root / "FSD50K.ground_truth/eval.csv", ["fname", "labels", "mids"], evaluation)
    return root


MAKERS = {
    "gtzan": make_gtzan,
    "esc50": make_esc50,
    "us8k": make_us8k,
    "nsynth": make_nsynth,
    "openmic": make_openmic,
    "mtt": make_mtt,
    "fsd50k": make_fsd50k,
}


def make_task(name: str, root: Path, **kwargs) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return MAKERS[name](root, **kwargs)


def save_tiny_matpac(directory: Path, seed: int = 0) -> Path:
    """A random tiny MATPAC encoder and its feature extractor, saved like a converted checkpoint."""
    import torch

    from modeling_matpac import MatpacConfig, MatpacFeatureExtractor, MatpacModel

    torch.manual_seed(seed)
    config = MatpacConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    MatpacModel(config).save_pretrained(directory)
    MatpacFeatureExtractor().save_pretrained(directory)
    return directory


# Tests -----------------------------------------------------------------------------------------------------------


def test_esc50_folds_and_labels_follow_the_csv(tmp_path):
    data = load_task("esc50", make_task("esc50", tmp_path / "ESC-50-master"))
    assert data.fold is not None and data.split is None
    assert sorted(np.unique(data.fold)) == [1, 2, 3, 4, 5]
    row = data.ids.index("3-1031-A-1.wav")
    assert (data.fold[row], data.classes[data.targets[row]]) == (3, "rooster")
    waveform, sampling_rate = data.audio[row]
    assert sampling_rate == 44100 and waveform.shape == (22050,)


def test_us8k_reads_audio_fold_folders(tmp_path):
    data = load_task("us8k", make_task("us8k", tmp_path / "UrbanSound8K"))
    assert len(data) == 30 and sorted(np.unique(data.fold)) == list(range(1, 11))
    row = data.ids.index("107-8-0-1.wav")  # fsID 107 = fold 7, classID 8 = siren
    assert data.fold[row] == 7 and data.classes[data.targets[row]] == "siren"
    assert data.audio.paths[row].endswith("audio/fold7/107-8-0-1.wav")
    assert len(data.classes) == 10  # the task's full vocabulary, not only the classes present


def test_gtzan_uses_the_fault_filtered_lists_only(tmp_path):
    data = load_task("gtzan", make_task("gtzan", tmp_path / "gtzan"))
    assert data.classes == list(GTZAN_GENRES)
    for split, numbers in GTZAN_FAKE.items():
        expected = {f"{g}/{g}.{n:05d}.wav" for g in ("blues", "jazz", "rock") for n in numbers}
        assert {clip for clip, s in zip(data.ids, data.split) if s == split} == expected
    assert not any(clip.endswith(".00008.wav") for clip in data.ids)  # listed nowhere: unused
    row = data.ids.index("jazz/jazz.00004.wav")
    assert data.classes[data.targets[row]] == "jazz" and data.split[row] == "valid"


def test_gtzan_accepts_the_original_au_files(tmp_path):
    root = make_task("gtzan", tmp_path / "gtzan")
    for wav in (root / "genres").glob("*/*.wav"):
        waveform, sampling_rate = sf.read(wav)
        sf.write(wav.with_suffix(".au"), waveform, sampling_rate)
        wav.unlink()
    data = load_task("gtzan", root)
    assert len(data) == 24 and all(path.endswith(".au") for path in data.audio.paths)


def test_nsynth_official_splits_and_families(tmp_path):
    data = load_task("nsynth", make_task("nsynth", tmp_path / "nsynth"))
    assert len(data.classes) == 11
    assert {s: int((data.split == s).sum()) for s in ("train", "valid", "test")} == {
        "train": 12,
        "valid": 6,
        "test": 6,
    }
    row = data.ids.index("organ_acoustic_001-061-100")
    assert data.classes[data.targets[row]] == "organ"


def test_openmic_keeps_partial_labels(tmp_path):
    root = make_task("openmic", tmp_path / "openmic-2018")
    data = load_task("openmic", root)
    with np.load(root / "openmic-2018.npz", allow_pickle=True) as npz:
        keys, y_true, y_mask = list(npz["sample_key"]), npz["Y_true"], npz["Y_mask"]
    rows = [keys.index(clip) for clip in data.ids]
    np.testing.assert_array_equal(data.label_mask, y_mask[rows])
    np.testing.assert_array_equal(data.targets, (y_mask & (y_true >= 0.5))[rows].astype(np.float32))
    assert (data.split == "train").sum() == 16 and (data.split == "test").sum() == 8
    # Class i names column i of Y_true, as class-map.json says: not the alphabetical order of the names.
    assert data.classes == ["voice", "guitar", "piano"]
    row = data.ids.index(str(keys[2]))  # annotated voice positive, guitar and piano negative
    assert (y_true[2].tolist(), y_mask[2].tolist()) == ([1.0, 0.0, 0.0], [True, True, True])
    assert dict(zip(data.classes, data.targets[row].tolist())) == {"voice": 1.0, "guitar": 0.0, "piano": 0.0}

    # `select` (run_probe.py keeps the clips that decoded) takes every per-clip field along, the mask included.
    subset = data.select(np.array([3, 0, 17]))
    assert subset.ids == [data.ids[i] for i in (3, 0, 17)]
    np.testing.assert_array_equal(subset.label_mask, y_mask[[rows[i] for i in (3, 0, 17)]])
    np.testing.assert_array_equal(subset.targets, data.targets[[3, 0, 17]])
    assert subset.split.tolist() == [data.split[i] for i in (3, 0, 17)]


def test_mtt_takes_the_top_tags_from_the_annotations(tmp_path):
    root = make_task("mtt", tmp_path / "magnatagatune")
    data = load_task("mtt", root)
    assert data.classes == MTT_TAGS and data.targets.shape == (18, 3)
    with open(root / "annotations_final.csv", newline="") as handle:
        rows = {row["mp3_path"]: row for row in csv.DictReader(handle, delimiter="\t")}
    for clip, target in zip(data.ids, data.targets):
        assert target.tolist() == [float(rows[clip][tag]) for tag in MTT_TAGS]
    assert data.split.tolist() == ["train"] * 12 + ["valid"] * 3 + ["test"] * 3  # split/{train,valid,test}.npy
    waveform, _ = data.audio[0]  # mp3 decodes with soundfile
    assert waveform.shape[0] > 7000


def test_fsd50k_dev_val_becomes_validation(tmp_path):
    data = load_task("fsd50k", make_task("fsd50k", tmp_path / "FSD50K"))
    assert data.classes == FSD50K_VOCABULARY
    assert {s: int((data.split == s).sum()) for s in ("train", "valid", "test")} == {
        "train": 14,
        "valid": 6,
        "test": 10,
    }
    row = data.ids.index("1001")
    assert data.targets[row].tolist() == [0.0, 1.0, 1.0, 0.0]  # "Guitar,Speech"


def test_missing_layout_says_where_to_get_the_data(tmp_path):
    with pytest.raises(ProbeDataError, match=r"ESC-50 not found .* missing meta/esc50.csv") as error:
        load_task("esc50", tmp_path)
    assert "https://github.com/karolpiczak/ESC-50" in str(error.value)
    assert "meta/esc50.csv" in str(error.value) and "ashraq/esc50" in str(error.value)
    with pytest.raises(ProbeDataError, match="does not exist"):
        load_task("esc50", tmp_path / "nowhere")
    with pytest.raises(ProbeDataError, match="no script-free copy on the Hub"):
        load_task("openmic")


def test_unknown_task_is_refused():
    with pytest.raises(ProbeDataError, match="Unknown task 'esc100'; choose one of gtzan, esc50"):
        load_task("esc100", "/tmp")


def test_missing_files_and_unknown_labels_are_skipped_with_a_warning(tmp_path, caplog):
    root = make_task("fsd50k", tmp_path / "FSD50K")
    (root / "FSD50K.dev_audio/1002.wav").unlink()
    write_clip(root / "FSD50K.eval_audio/5010.wav", 0)
    with open(root / "FSD50K.ground_truth/eval.csv", "a") as handle:
        handle.write("5010,Yodel,\n")  # outside vocabulary.csv
    caplog.set_level(logging.WARNING)
    data = load_task("fsd50k", root)
    assert "1002" not in data.ids and len(data) == 29
    assert "skipped 1 clip(s) whose audio file is missing" in caplog.text and "1002.wav" in caplog.text
    assert "skipped 1 clip(s) with labels outside the task's vocabulary: 5010 (Yodel)" in caplog.text


def test_gtzan_list_entry_outside_the_ten_genres_is_skipped(tmp_path, caplog):
    root = make_task("gtzan", tmp_path / "gtzan", genres=("blues", "polka"))
    caplog.set_level(logging.WARNING)
    data = load_task("gtzan", root)
    assert set(data.classes[t] for t in data.targets) == {"blues"}
    assert "with labels outside the task's vocabulary" in caplog.text and "polka/polka.00000.wav" in caplog.text


def test_esc50_csv_without_its_columns_is_an_error(tmp_path):
    root = make_task("esc50", tmp_path / "esc50")
    write_csv(root / "meta/esc50.csv", ["filename", "fold", "target"], [["1-1000-A-0.wav", 1, 0]])
    with pytest.raises(ProbeDataError, match=r"esc50.csv lacks the column\(s\) \['category'\]"):
        load_task("esc50", root)


def test_mtt_split_tag_missing_from_annotations_is_an_error(tmp_path):
    root = make_task("mtt", tmp_path / "mtt")
    np.save(root / "split/tags.npy", np.array(["guitar", "banjo"]))
    with pytest.raises(ProbeDataError, match=r"annotations_final.csv lacks the column\(s\) \['banjo'\]"):
        load_task("mtt", root)


def test_audiofolder_without_splits_gets_stratified_folds(tmp_path):
    """Unbalanced classes (10 cats, 5 dogs): only stratified folds give every fold the classes' 2 : 1 ratio."""
    for label, (name, count) in enumerate([("cat", 10), ("dog", 5)]):
        for number in range(count):
            write_clip(tmp_path / name / f"{number}.flac", label, seed=number)
    data = load_task("audiofolder", tmp_path)
    assert data.classes == ["cat", "dog"] and len(data) == 15
    for fold in range(1, 6):  # each fold holds two cats and one dog
        assert sorted(data.targets[data.fold == fold].tolist()) == [0, 0, 1], fold


@pytest.mark.parametrize("valid_folder", ["valid", "validation", "dev"])
def test_audiofolder_with_split_folders(tmp_path, valid_folder):
    """Each of the three documented names of the validation folder is the valid split, not more training data."""
    for split in ("train", valid_folder, "test"):
        for label, name in enumerate(["cat", "dog"]):
            write_clip(tmp_path / split / name / "a.wav", label)
    data = load_task("audiofolder", tmp_path)
    assert clip_counts(data) == {"train": 2, "valid": 2, "test": 2}
    assert [clip for clip, split in zip(data.ids, data.split) if split == "valid"] == [
        f"{valid_folder}/cat/a.wav",
        f"{valid_folder}/dog/a.wav",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeDataError, match="No audio files"):
        load_task("audiofolder", tmp_path / "empty")


def test_a_stereo_clip_is_probed_as_the_mean_of_its_channels(tmp_path):
    """The probe's clips (`read_mono`, behind every task's audio) average the channels; the left one alone is wrong."""
    root = make_task("esc50", tmp_path / "esc50")
    t = np.arange(22050) / 44100
    left, right = 0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 1000 * t) - 0.1
    sf.write(root / "audio/3-1031-A-1.wav", np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    data = load_task("esc50", root)
    waveform, sampling_rate = data.audio[data.ids.index("3-1031-A-1.wav")]
    assert sampling_rate == 44100 and waveform.shape == (22050,)
    np.testing.assert_allclose(waveform, (left + right) / 2, atol=1e-6)
    np.testing.assert_allclose(read_mono(root / "audio/3-1031-A-1.wav")[0], (left + right) / 2, atol=1e-6)


def test_corrupt_audio_raises_a_read_error(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not audio at all")
    with pytest.raises(AudioDecodeError, match="cannot decode .*bad.wav"):
        read_mono(tmp_path / "bad.wav")


def test_hub_copy_layout_is_read_with_datasets(tmp_path, monkeypatch):
    """A local parquet copy with the columns of `ashraq/esc50` goes through the Hub loading path."""
    import io

    import datasets
    from datasets import Audio, Dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # read at load time
    rows = {"filename": [], "fold": [], "target": [], "category": [], "audio": []}
    for fold in range(1, 6):
        for category, target in [*ESC50_FAKE.items(), ("??", 3)]:
            buffer = io.BytesIO()
            sf.write(buffer, np.zeros(8000, np.float32) + 0.01 * target, 16000, format="WAV")
            rows["filename"].append(f"{fold}-{target}-A-{target}.wav")
            rows["fold"].append(fold)
            rows["target"].append(target)
            rows["category"].append(category)
            rows["audio"].append({"bytes": buffer.getvalue(), "path": rows["filename"][-1]})
    copies = {
        "esc50": Dataset.from_dict(rows).cast_column("audio", Audio()),
        # Before: an AttributeError. A Parquet copy written without the Audio type holds {bytes, path} records.
        "esc50-plain": Dataset.from_dict(rows),
    }
    for name, copy in copies.items():
        (tmp_path / name / "data").mkdir(parents=True)
        copy.to_parquet(tmp_path / name / "data/train-00000.parquet")
        data = load_task("esc50", hub_dataset=str(tmp_path / name))
        assert data.source == f"hub:{tmp_path / name}"
        assert data.classes == list(ESC50_CLASSES) and len(data) == 15  # "??" is no ESC-50 class: skipped
        row = data.ids.index("4-1-A-1.wav")
        assert data.fold[row] == 4 and data.targets[row] == 1 and data.classes[1] == "rooster"
        waveform, sampling_rate = data.audio[row]
        assert sampling_rate == 16000 and np.allclose(waveform, 0.01, atol=1e-4)
        subset = data.select(np.array([row]))
        assert subset.ids == ["4-1-A-1.wav"] and np.allclose(subset.audio[0][0], 0.01, atol=1e-4)
    (tmp_path / "esc50-text/data").mkdir(parents=True)
    Dataset.from_dict({**rows, "audio": rows["filename"]}).to_parquet(tmp_path / "esc50-text/data/train.parquet")
    with pytest.raises(ProbeDataError, match="The 'audio' column holds Value\\('string'\\), not audio"):
        load_task("esc50", hub_dataset=str(tmp_path / "esc50-text"))


def test_hub_copy_with_split_files_keeps_validation_and_test_apart(tmp_path, monkeypatch):
    """GTZAN's Hub layout (`data/{train,validation,test}-*.parquet`): the validation file is the valid split."""
    import io

    import datasets
    from datasets import Audio, Dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    parts = {"train": ["blues", "jazz", "rock", "blues"], "validation": ["jazz", "jazz"], "test": ["rock"] * 3}
    (tmp_path / "gtzan/data").mkdir(parents=True)
    for level, (name, genres) in enumerate(parts.items(), start=1):
        buffer = io.BytesIO()
        sf.write(buffer, np.zeros(8000, np.float32) + 0.01 * level, 16000, format="WAV")
        audio = [{"bytes": buffer.getvalue(), "path": f"{name}-{row}.wav"} for row in range(len(genres))]
        part = Dataset.from_dict({"genre": genres, "audio": audio}).cast_column("audio", Audio())
        part.to_parquet(tmp_path / f"gtzan/data/{name}-00000-of-00001.parquet")
    data = load_task("gtzan", hub_dataset=str(tmp_path / "gtzan"))
    sizes = {"train": 4, "valid": 2, "test": 3}
    assert clip_counts(data) == sizes
    assert data.ids == [f"{split}/{row}" for split, size in sizes.items() for row in range(size)]
    assert [data.classes[t] for t in data.targets[data.split == "valid"]] == ["jazz", "jazz"]
    assert [data.classes[t] for t in data.targets[data.split == "test"]] == ["rock"] * 3
    waveform, _ = data.audio[data.ids.index("valid/1")]
    assert np.allclose(waveform, 0.02, atol=1e-4)  # the validation file's audio


def test_find_task_dir_knows_the_official_folder_names(tmp_path):
    (tmp_path / "ESC-50-master").mkdir()
    (tmp_path / "FSD50K").mkdir()
    assert find_task_dir("esc50", tmp_path) == tmp_path / "ESC-50-master"
    assert find_task_dir("fsd50k", tmp_path) == tmp_path / "FSD50K"
    assert find_task_dir("us8k", tmp_path) is None
    assert len(PAPER_TASKS) == 7


def test_esc50_classes_are_indexed_by_its_target_column(tmp_path):
    root = make_task("esc50", tmp_path / "ESC-50-master")
    data = load_task("esc50", root)
    assert len(data.classes) == 50 and data.classes[:3] == ["dog", "rooster", "pig"] and data.classes[49] == "hand_saw"
    with open(root / "meta/esc50.csv", newline="") as handle:
        targets = {row["filename"]: int(row["target"]) for row in csv.DictReader(handle)}
    assert [int(target) for target in data.targets] == [targets[clip] for clip in data.ids]
    assert sorted(set(data.targets.tolist())) == [0, 1, 10]  # dog, rooster, rain: not their alphabetical 0, 2, 1

    text = (root / "meta/esc50.csv").read_text().replace(",1,rooster,", ",2,rooster,")
    (root / "meta/esc50.csv").write_text(text)
    with pytest.raises(
        ProbeDataError, match=r"numbers its classes otherwise than the official ESC-50 \(2 = rooster\)"
    ):
        load_task("esc50", root)


def test_openmic_clip_without_annotated_classes_stays_unannotated(tmp_path):
    root = make_task("openmic", tmp_path / "openmic-2018")
    with np.load(root / "openmic-2018.npz", allow_pickle=True) as npz:
        arrays = dict(npz)
    arrays["Y_mask"][5] = False  # annotated for none of the classes
    np.savez(root / "openmic-2018.npz", **arrays)
    data = load_task("openmic", root)
    row = data.ids.index(str(arrays["sample_key"][5]))
    assert data.label_mask[row].tolist() == [False, False, False]
    assert data.targets[row].tolist() == [0.0, 0.0, 0.0]
    assert data.label_mask.sum() == arrays["Y_mask"].sum()


def test_clip_counts_are_checked_against_the_complete_dataset(tmp_path, caplog, monkeypatch):
    from dataclasses import replace

    from modeling_matpac.evaluation import tasks

    data = load_task("gtzan", make_task("gtzan", tmp_path / "gtzan"))
    message = (
        "GTZAN: found train: 12 / valid: 6 / test: 6 clips, the complete dataset has train: 443 / valid: 197 / "
        "test: 290."
    )
    with pytest.raises(ProbeDataError, match="Pass --allow_incomplete") as error:
        check_clip_counts(data)
    assert message in str(error.value) and "jazz/jazz.00054.wav" in str(error.value)
    caplog.set_level(logging.WARNING)
    assert check_clip_counts(data, allow_incomplete=True) is False
    assert message in caplog.text and "Probing these clips anyway (--allow_incomplete)" in caplog.text

    # The fake copy's own sizes pass; one clip less in one fold does not.
    esc50 = load_task("esc50", make_task("esc50", tmp_path / "esc50"))
    monkeypatch.setitem(
        tasks.TASKS, "esc50", replace(tasks.TASKS["esc50"], expected_clips=dict.fromkeys(range(1, 6), 3))
    )
    assert check_clip_counts(esc50) is True
    with pytest.raises(ProbeDataError, match="found fold 1: 3 / fold 2: 2 / fold 3: 3 .* fold 2: 3 / fold 3: 3"):
        check_clip_counts(esc50.select(np.flatnonzero(esc50.ids != np.array("2-1021-A-1.wav"))))
    assert check_clip_counts(load_task("audiofolder", make_task("gtzan", tmp_path / "folder") / "genres")) is True


def test_every_paper_task_states_its_complete_sizes():
    from modeling_matpac.evaluation.tasks import TASKS

    assert {name: sum(TASKS[name].expected_clips.values()) for name in PAPER_TASKS} == {
        "gtzan": 930,
        "esc50": 2_000,
        "us8k": 8_732,
        "nsynth": 305_979,
        "openmic": 20_000,
        "mtt": 21_105,
        "fsd50k": 51_197,
    }


def _append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def _replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _drop_family(path: Path) -> None:
    examples = json.loads(path.read_text())
    del examples[next(iter(examples))]["instrument_family_str"]
    path.write_text(json.dumps(examples))


def _shrink_y_mask(path: Path) -> None:
    with np.load(path, allow_pickle=True) as npz:
        arrays = dict(npz)
    arrays["Y_mask"] = arrays["Y_mask"][:, :2]
    np.savez(path, **arrays)


def _flip_a_byte_of_y_true(path: Path) -> None:
    """Damages Y_true's compressed bytes inside the zip: `np.load` opens the file, the CRC fails at reading it."""
    member = zipfile.ZipFile(path).getinfo("Y_true.npy")
    data = bytearray(path.read_bytes())
    data[member.header_offset + 30 + len(member.filename) + 100] ^= 0xFF
    path.write_bytes(bytes(data))


def _y_true_as_strings(path: Path) -> None:
    with np.load(path, allow_pickle=True) as npz:
        arrays = dict(npz)
    arrays["Y_true"] = arrays["Y_true"].astype(str)
    np.savez(path, **arrays)


MALFORMED = {
    "mtt split list empty": (
        "mtt",
        lambda root: (root / "split/test.npy").write_bytes(b""),
        r"split/test.npy is not a numpy array of strings",
    ),
    "mtt tags a 0-d array": (
        "mtt",
        lambda root: np.save(root / "split/tags.npy", np.array("guitar")),
        r"split/tags.npy is not a 1-D numpy array of strings: shape \(\)",
    ),
    "openmic Y_true failing its CRC": (
        "openmic",
        lambda root: _flip_a_byte_of_y_true(root / "openmic-2018.npz"),
        r"openmic-2018.npz: cannot read Y_true and Y_mask: Bad CRC-32 for file 'Y_true.npy'",
    ),
    "openmic Y_true of strings": (
        "openmic",
        lambda root: _y_true_as_strings(root / "openmic-2018.npz"),
        r"openmic-2018.npz: Y_true must be a numeric array, got dtype <U",
    ),
    "nsynth examples.json not JSON": (
        "nsynth",
        lambda root: (root / "nsynth-valid/examples.json").write_text("{not json"),
        r"nsynth-valid/examples.json is not valid JSON",
    ),
    "nsynth note without family": (
        "nsynth",
        lambda root: _drop_family(root / "nsynth-test/examples.json"),
        r"nsynth-test/examples.json: note 'bass_acoustic_020-060-100' has no instrument_family_str",
    ),
    "openmic class map a list": (
        "openmic",
        lambda root: (root / "class-map.json").write_text('["guitar", "piano", "voice"]'),
        r"class-map.json must map each class name to its column of Y_true",
    ),
    "openmic class map with a gap": (
        "openmic",
        lambda root: (root / "class-map.json").write_text('{"guitar": 0, "piano": 1, "voice": 3}'),
        r"class-map.json must map each class name to its column of Y_true",
    ),
    "openmic npz not a zip": (
        "openmic",
        lambda root: (root / "openmic-2018.npz").write_bytes(b"PK\x03\x04 truncated"),
        r"openmic-2018.npz is not a readable .npz file",
    ),
    "openmic Y_mask of another shape": (
        "openmic",
        lambda root: _shrink_y_mask(root / "openmic-2018.npz"),
        r"Y_mask has shape \(24, 2\), expected \(24, 3\)",
    ),
    "fsd50k vocabulary short row": (
        "fsd50k",
        lambda root: _replace_in(root / "FSD50K.ground_truth/vocabulary.csv", "2,Speech,/m/0002", "7"),
        r"vocabulary.csv, line 3: expected `index,name,mid`, got '7'",
    ),
    "fsd50k dev split unknown": (
        "fsd50k",
        lambda root: _replace_in(root / "FSD50K.ground_truth/dev.csv", "1000,Bark,,train", "1000,Bark,,tarin"),
        r"dev.csv: split 'tarin' of 1000 is neither train nor val",
    ),
    "esc50 fold not a number": (
        "esc50",
        lambda root: _replace_in(root / "meta/esc50.csv", "1-1010-A-0.wav,1,", "1-1010-A-0.wav,one,"),
        r"meta/esc50.csv: fold 'one' of 1-1010-A-0.wav is not an integer",
    ),
    "esc50 csv not UTF-8": (
        "esc50",
        lambda root: (root / "meta/esc50.csv").write_bytes((root / "meta/esc50.csv").read_bytes() + b"d\xf6g\n"),
        r"meta/esc50.csv cannot be read as a UTF-8 CSV file",
    ),
    "us8k short row": (
        "us8k",
        lambda root: _append(root / "metadata/UrbanSound8K.csv", "999-0-0-0.wav,999,0.0\n"),
        r"UrbanSound8K.csv, line 32: 3 field\(s\), expected at least 8",
    ),
    "gtzan split list not UTF-8": (
        "gtzan",
        lambda root: (root / "test_filtered.txt").write_bytes(b"blues/blues.\xff.wav\n"),
        r"test_filtered.txt cannot be read as UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_metadata_is_a_probe_data_error_naming_the_file(tmp_path, case):
    """`run_probe.py --all` skips a task on ProbeDataError only: any other exception would end the whole run."""
    task, damage, message = MALFORMED[case]
    root = make_task(task, tmp_path / task)
    damage(root)
    with pytest.raises(ProbeDataError, match=message) as error:
        load_task(task, root)
    assert str(root) in str(error.value) and "\n" not in str(error.value)


def test_clips_listed_twice_are_refused(tmp_path):
    """A test clip that is also a training clip would inflate the score without any sign of it."""
    root = make_task("gtzan", tmp_path / "gtzan")
    _append(root / "train_filtered.txt", (root / "test_filtered.txt").read_text())
    with pytest.raises(
        ProbeDataError,
        match=r"gtzan: 6 clip id\(s\) are listed more than once .* e.g. blues/blues.00006.wav \(in test, train\)",
    ):
        load_task("gtzan", root)

    root = make_task("esc50", tmp_path / "esc50")
    _append(root / "meta/esc50.csv", "1-1010-A-0.wav,2,0,dog,False,1010,A\n")
    with pytest.raises(ProbeDataError, match=r"esc50: 1 clip id\(s\) .* e.g. 1-1010-A-0.wav \(in fold 1, fold 2\)"):
        load_task("esc50", root)


def test_hub_copy_with_a_clip_twice_is_refused(tmp_path, monkeypatch):
    import datasets
    from datasets import Dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    audio = {"bytes": b"", "path": "1-0-A-0.wav"}
    rows = {"filename": ["1-0-A-0.wav"] * 2, "fold": [1, 2], "category": ["dog"] * 2, "audio": [audio] * 2}
    (tmp_path / "esc50/data").mkdir(parents=True)
    Dataset.from_dict(rows).to_parquet(tmp_path / "esc50/data/train-00000.parquet")
    with pytest.raises(ProbeDataError, match=r"esc50: 1 clip id\(s\) .*hub:.* e.g. 1-0-A-0.wav \(in fold 1, fold 2\)"):
        load_task("esc50", hub_dataset=str(tmp_path / "esc50"))


def test_audiofolder_with_two_folders_for_one_split_is_refused(tmp_path):
    for split in ("train", "valid", "validation", "test"):
        for label, name in enumerate(["cat", "dog"]):
            write_clip(tmp_path / split / name / "a.wav", label)
    with pytest.raises(ProbeDataError, match=r"has valid/ and validation/, which are both the valid split"):
        load_task("audiofolder", tmp_path)


@pytest.mark.filterwarnings("ignore:The least populated class")  # sklearn's own note on the one-clip class
def test_audiofolder_needs_two_classes_and_names_classes_it_cannot_train_on(tmp_path, caplog):
    for number in range(6):
        write_clip(tmp_path / "single" / "cat" / f"{number}.wav", 0, seed=number)
    with pytest.raises(ProbeDataError, match=r"all clips are of the class 'cat'; a probe needs 2 classes or more"):
        load_task("audiofolder", tmp_path / "single")

    caplog.set_level(logging.WARNING)
    for split, names in (("train", ["cat", "dog"]), ("test", ["cat", "dog", "owl", "pig"])):
        for label, name in enumerate(names):
            write_clip(tmp_path / "splits" / split / name / "a.wav", label)
    data = load_task("audiofolder", tmp_path / "splits")
    assert data.classes == ["cat", "dog", "owl", "pig"]
    assert "audiofolder: class(es) owl, pig have test clips but none in train/." in caplog.text

    caplog.clear()
    for label, (name, count) in enumerate({"cat": 5, "dog": 5, "owl": 1}.items()):
        for number in range(count):
            write_clip(tmp_path / "folds" / name / f"{number}.wav", label, seed=number)
    load_task("audiofolder", tmp_path / "folds")
    assert "audiofolder: class(es) owl have clips in one fold only" in caplog.text and "dog" not in caplog.text

    # Before: scikit-learn's "n_splits=5 cannot be greater than the number of members in each class".
    for label, name in enumerate(["cat", "dog"]):
        for number in range(4):
            write_clip(tmp_path / "small" / name / f"{number}.wav", label, seed=number)
    with pytest.raises(ProbeDataError, match=r"no class has 5 clips \(the largest has 4\), too few for 5 cross"):
        load_task("audiofolder", tmp_path / "small")


def test_folds_and_splits_emptied_by_undecodable_clips(tmp_path, caplog):
    """The decodable clips are checked again after encoding (run_probe.py): a fold that lost all its clips shows."""
    for label, name in enumerate(["cat", "dog"]):
        for number in range(5):
            write_clip(tmp_path / name / f"{number}.wav", label, seed=number)
    data = load_task("audiofolder", tmp_path)
    assert data.num_folds == 5 and check_clip_counts(data) is True

    caplog.set_level(logging.WARNING)
    assert check_clip_counts(data.select(np.flatnonzero(data.fold != 3))) is False
    assert "audiofolder: fold(s) 3 of 5 have no clip left" in caplog.text
    assert "cross-validating on the other 4 folds" in caplog.text
    for fold in (1, 5):  # the ends of the fold range
        caplog.clear()
        assert check_clip_counts(data.select(np.flatnonzero(data.fold != fold))) is False, fold
        assert f"audiofolder: fold(s) {fold} of 5 have no clip left" in caplog.text, fold
    with pytest.raises(ProbeDataError, match=r"audiofolder: clips in fold 2: 2 only; cross-validation needs 2 folds"):
        check_clip_counts(data.select(np.flatnonzero(data.fold == 2)))

    gtzan = load_task("gtzan", make_task("gtzan", tmp_path / "gtzan"))
    with pytest.raises(ProbeDataError, match=r"gtzan: found train: 12 / valid: 6 clips; train and test clips are"):
        check_clip_counts(gtzan.select(np.flatnonzero(gtzan.split != "test")), allow_incomplete=True)


def test_per_clip_data_of_different_lengths_is_refused():
    """Misaligned arrays would score each clip after the gap with its neighbour's labels or mask, without an error."""
    audio = AudioFiles([f"{index}.wav" for index in range(3)])
    good = dict(task="t", classes=["a", "b"], ids=["0", "1", "2"], audio=audio, targets=np.zeros((3, 2)))
    ProbeData(**good, split=np.array(["train", "train", "test"]), label_mask=np.ones((3, 2), bool))
    with pytest.raises(ValueError, match=r"t: per-clip data of different lengths: 3 ids, .*'label_mask': 2"):
        ProbeData(**good, split=np.array(["train", "train", "test"]), label_mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"t: label_mask of shape \(3, 3\) for targets of shape \(3, 2\)"):
        ProbeData(**good, split=np.array(["train", "train", "test"]), label_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match=r"per-clip data of different lengths: 3 ids, .*'fold': 4"):
        ProbeData(**good, fold=np.array([1, 2, 3, 4]))
