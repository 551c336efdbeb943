"""run_probe.py end to end on fake copies of the seven tasks; the saved probe as an audio-classification pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from test_tasks import make_task, save_tiny_matpac

from modeling_matpac import MatpacModel
from modeling_matpac.evaluation.embeddings import EmbeddingExtractor, load_or_extract
from modeling_matpac.evaluation.probe import ProbeSettings, check_head_folder, evaluate, save_classifier
from modeling_matpac.evaluation.tasks import PAPER_TASKS, TASKS, load_task


REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run_probe.py is a script at the repository root, outside the package
import run_probe  # noqa: E402


# The fake copies are far smaller than the real datasets: the clip-count check is tested on its own below.
FAST = ["--num_runs", "2", "--max_epochs", "4", "--patience", "2", "--learning_rate", "0.01", "--allow_incomplete"]
OFFICIAL_FOLDERS = {
    "gtzan": "gtzan",
    "esc50": "ESC-50-master",
    "us8k": "UrbanSound8K",
    "nsynth": "nsynth",
    "openmic": "openmic-2018",
    "mtt": "magnatagatune",
    "fsd50k": "FSD50K",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_matpac(tmp_path_factory.mktemp("tiny-matpac")))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    for task, folder in OFFICIAL_FOLDERS.items():
        make_task(task, root / folder)
    return root


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    original = MatpacModel.forward
    monkeypatch.setattr(MatpacModel, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def test_esc50_end_to_end_then_cached_rerun(tiny_model, data_root, tmp_path, forward_calls, monkeypatch):
    allocator_settings = []
    monkeypatch.setattr(run_probe, "keep_freed_memory_mapped", lambda: allocator_settings.append(1) or True)
    args = [
        "--dataset",
        "esc50",
        "--data_dir",
        str(data_root / "ESC-50-master"),
        "--model_name_or_path",
        tiny_model,
        "--output_dir",
        str(tmp_path),
        *FAST,
    ]
    (result,) = run_probe.main(args)
    assert len(forward_calls) == 2  # 15 clips, batches of 8
    assert allocator_settings == [1]  # on CPU the script keeps freed memory for the next batches
    assert (result.task, result.metric, result.num_folds, result.num_clips) == ("esc50", "accuracy", 5, 15)
    assert result.embedding_dim == 160 and result.paper == 93.5 and not result.extraction_cached
    assert len(result.runs) == 2  # the scores themselves are pinned at the end
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][0]["runs"] == pytest.approx(result.runs)
    assert saved["settings"]["probe"]["learning_rate"] == 0.01 and saved["settings"]["model"]["layer"] == "last"
    table = (tmp_path / "results.md").read_text()
    assert f"| esc50 | accuracy | {result.mean:.2f} ± {result.ci95:.2f} | 93.5 | 2 | 5 | 15 | 160 |" in table
    assert "| fold 1: 3 / fold 2: 3 / fold 3: 3 / fold 4: 3 / fold 5: 3 | no |" in table  # not the real 5 x 400
    assert saved["results"][0]["clips_per_split"] == {f"fold {fold}": 3 for fold in range(1, 6)}
    assert saved["results"][0]["complete"] is False

    # Other probe hyper-parameters: the embeddings come from the cache, the model never runs.
    (rerun,) = run_probe.main([*args, "--learning_rate", "0.001", "--num_runs", "3"])
    assert len(forward_calls) == 2 and rerun.extraction_cached and len(rerun.runs) == 3
    assert "(cached)" in (tmp_path / "results.md").read_text()

    # The scores the script exists to produce, against an independent path: the clips embedded afresh here, probed by
    # `evaluate` with the same settings, and the aggregates computed here: a run is the mean of its folds, the task
    # the mean of its runs with a Student-t interval. The rerun's folds and runs are uneven (a median would differ).
    data = load_task("esc50", data_root / "ESC-50-master")
    values, positions = EmbeddingExtractor(tiny_model)(data)
    assert positions.tolist() == list(range(15))
    for probed, learning_rate in [(result, 0.01), (rerun, 0.001)]:
        runs = len(probed.runs)
        settings = ProbeSettings(num_runs=runs, max_epochs=4, patience=2, learning_rate=learning_rate)
        folds = 100 * np.array(evaluate(data, values, settings).fold_scores)
        np.testing.assert_allclose(probed.fold_scores, folds)
        np.testing.assert_allclose(probed.runs, folds.mean(axis=1))
        assert probed.mean == pytest.approx(folds.mean())
        sem = folds.mean(axis=1).std(ddof=1) / np.sqrt(runs)
        assert probed.ci95 == pytest.approx(stats.t.ppf(0.975, runs - 1) * sem, abs=1e-9)


def test_all_tasks_found_under_their_official_folder_names(tiny_model, data_root, tmp_path):
    results = run_probe.main(
        [
            "--all",
            "--data_dir",
            str(data_root),
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path),
            *FAST,
        ]
    )
    assert [r.task for r in results] == list(PAPER_TASKS)
    assert {r.task: r.metric for r in results} == {
        "gtzan": "accuracy",
        "esc50": "accuracy",
        "us8k": "accuracy",
        "nsynth": "accuracy",
        "openmic": "mAP",
        "mtt": "mAP",
        "fsd50k": "mAP",
    }
    assert {r.task: r.num_folds for r in results} == {t: {"esc50": 5, "us8k": 10}.get(t, 1) for t in PAPER_TASKS}
    assert {r.task: r.paper for r in results} == {t: TASKS[t].paper_score for t in PAPER_TASKS}
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {task} |" in table for task in PAPER_TASKS) and "pending" not in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["task"] for row in saved["results"]] == list(PAPER_TASKS) and saved["pending"] == []


def test_all_keeps_the_finished_tasks_when_a_later_one_fails(tiny_model, data_root, tmp_path, monkeypatch):
    """The third task's probe fails (here, as a stopped run would): the first two tasks' results are on disk."""
    calls = []

    def failing_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run_probe, "evaluate", failing_third)
    args = ["--all", "--data_dir", str(data_root), "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path)]
    with pytest.raises(RuntimeError, match="went away"):
        run_probe.main(args + FAST)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["task"] for row in saved["results"]] == list(PAPER_TASKS[:2])
    assert all(len(row["runs"]) == 2 for row in saved["results"])
    assert saved["pending"] == list(PAPER_TASKS[2:]) and saved["skipped"] == {}
    table = (tmp_path / "results.md").read_text()
    assert f"| {PAPER_TASKS[2]} | - | pending: not probed yet |" in table
    assert not list(tmp_path.glob("*.partial"))


def test_all_skips_tasks_without_data(tiny_model, tmp_path, caplog):
    make_task("nsynth", tmp_path / "data" / "nsynth")
    results = run_probe.main(
        [
            "--all",
            "--data_dir",
            str(tmp_path / "data"),
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path / "out"),
            *FAST,
        ]
    )
    assert [r.task for r in results] == ["nsynth"]
    assert "openmic: skipped, no openmic or openmic-2018 or OpenMIC-2018 folder" in caplog.text
    assert f"esc50: skipped, no esc50 or ESC-50 or ESC-50-master folder in {tmp_path / 'data'}" in caplog.text
    table = (tmp_path / "out" / "results.md").read_text()
    assert (
        f"| esc50 | - | skipped: no esc50 or ESC-50 or ESC-50-master folder in {tmp_path / 'data'} | 93.5 |" in table
    )
    skipped = json.loads((tmp_path / "out" / "results.json").read_text())["skipped"]
    assert sorted(skipped) == sorted(set(PAPER_TASKS) - {"nsynth"})


def test_all_without_data_dir_reads_the_hub_copies(tiny_model, tmp_path, caplog):
    with pytest.raises(
        SystemExit, match="No task could be probed: no usable task data on the Hub, and no --data_dir was given"
    ):
        run_probe.main(["--all", "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path)])
    assert "gtzan: skipped, Cannot load GTZAN from the Hub dataset 'confit/gtzan-parquet'" in caplog.text  # offline
    assert "mtt: skipped, MagnaTagATune (top-50 tags) has no script-free copy on the Hub" in caplog.text
    assert "nsynth: skipped, NSynth (instrument family) has no script-free copy on the Hub" in caplog.text
    assert not (tmp_path / "results.json").exists()  # no task probed: nothing to keep, no table of pending tasks


@pytest.mark.parametrize("encoder", ["encoder", "tagger's encoder"])
def test_saved_head_is_an_audio_classification_pipeline(tiny_model, data_root, tmp_path, encoder):
    from transformers import pipeline

    data = load_task("nsynth", data_root / "nsynth")
    extractor = EmbeddingExtractor(tiny_model)
    if encoder == "tagger's encoder":  # before: its head was built for the frequency mean and a BatchNorm, and failed
        extractor.model.config.classifier_pooling, extractor.model.config.classifier_batch_norm = (
            "frequency_mean",
            True,
        )
    embeddings = load_or_extract(data, extractor, tmp_path / "cache")
    outcome = evaluate(data, embeddings.values, ProbeSettings(num_runs=1, max_epochs=5, learning_rate=0.01))
    save_classifier(extractor.model, extractor.feature_extractor, outcome.first_probe, data.classes, tmp_path / "head")

    classifier = pipeline("audio-classification", model=str(tmp_path / "head"), top_k=None)
    clip = 7
    predictions = classifier(data.audio[clip][0])
    expected = outcome.first_probe.scores(embeddings.values[clip : clip + 1])[0]
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(dict(zip(data.classes, expected)), abs=1e-5)
    config = json.loads((tmp_path / "head/config.json").read_text())
    assert config["problem_type"] == "single_label_classification" and config["id2label"]["3"] == "guitar"


def test_save_head_from_the_command_line_for_a_multi_label_task(tiny_model, data_root, tmp_path):
    results = run_probe.main(
        [
            "--dataset",
            "fsd50k",
            "--data_dir",
            str(data_root / "FSD50K"),
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path),
            "--save_head",
            str(tmp_path / "head"),
            *FAST,
        ]
    )
    from transformers import AutoModelForAudioClassification

    model = AutoModelForAudioClassification.from_pretrained(tmp_path / "head")
    assert model.config.problem_type == "multi_label_classification"
    assert [model.config.id2label[i] for i in range(4)] == ["Bark", "Guitar", "Speech", "Wind"]
    encoder = MatpacModel.from_pretrained(tiny_model)
    torch.testing.assert_close(model.matpac.state_dict(), encoder.state_dict())
    # A model card, as a converted probe has: what the head is, its scores, how to use it.
    card = (tmp_path / "head" / "README.md").read_text()
    result = results[0]
    assert f"# FSD50K: a linear probe on {tiny_model}" in card
    assert f"mAP {result.fold_scores[0][0]:.2f} % on the test split" in card
    assert f"{result.mean:.2f} ± {result.ci95:.2f} % on {result.num_clips} clips" in card
    assert "multi-label: the pipeline applies a sigmoid" in card and f'model="{tmp_path / "head"}"' in card


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Pass either --dataset NAME or --all"),
        (["--dataset", "esc50", "--data_dir", "{empty}"], "ESC-50 not found .* missing meta/esc50.csv"),
        (["--dataset", "openmic"], "OpenMIC-2018 has no script-free copy on the Hub"),
        (["--dataset", "nsynth"], "NSynth \\(instrument family\\) has no script-free copy on the Hub"),
        (["--dataset", "audiofolder"], "audiofolder needs --data_dir"),
        (
            ["--dataset", "esc50", "--layer", "2", "--save_head", "x", "--data_dir", "{empty}"],
            "leave --layer at 'last'",
        ),
        (["--dataset", "esc50", "--layer", "top"], "--layer must be 'last', 'all' or a block number"),
        (["--all", "--hub_dataset", "x"], "use it with --dataset, not --all"),
        (["--dataset", "gtzan", "--hub_dataset", "x", "--data_dir", "{empty}"], "pass one of them"),
        # Before: tracebacks, for --save_head only after the whole probe had run, with its results unwritten.
        (["--dataset", "esc50", "--save_head", "{empty}/a-file"], "--save_head '.*a-file' is a file, not a folder."),
        (["--dataset", "esc50", "--cache_dir", "{empty}/a-file"], "--cache_dir '.*a-file' is a file, not a folder."),
        (
            ["--dataset", "esc50", "--output_dir", "{empty}/a-file/results"],
            "--output_dir '.*a-file/results' is inside .*a-file, a file, not a folder.",
        ),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message, tmp_path):
    (tmp_path / "a-file").write_text("")
    args = [arg.replace("{empty}", str(tmp_path)) for arg in args]
    with pytest.raises(SystemExit, match=message):
        run_probe.main(["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path), *args])


def test_all_skips_a_task_whose_clips_do_not_decode_and_probes_the_others(tiny_model, tmp_path, caplog):
    """A task folder in which no clip decodes is that task's data problem: skipped, like a missing folder."""
    esc50 = make_task("esc50", tmp_path / "data" / "ESC-50-master")
    for clip in (esc50 / "audio").iterdir():
        clip.write_bytes(b"not audio")
    make_task("us8k", tmp_path / "data" / "UrbanSound8K")
    args = ["--all", "--data_dir", str(tmp_path / "data"), "--model_name_or_path", tiny_model]
    results = run_probe.main([*args, "--output_dir", str(tmp_path / "out"), *FAST])
    assert [r.task for r in results] == ["us8k"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["skipped"]["esc50"].startswith("esc50: none of the") and saved["pending"] == []
    assert [row["task"] for row in saved["results"]] == ["us8k"]


def test_save_head_is_checked_before_the_work_and_the_results_come_first(tiny_model, data_root, tmp_path, monkeypatch):
    """A model that cannot carry the head fails before encoding; a head that fails to save keeps the results."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    ast = tmp_path / "ast"
    ASTModel(
        ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(ast)
    ASTFeatureExtractor().save_pretrained(ast)
    args = ["--dataset", "nsynth", "--data_dir", str(data_root / "nsynth"), "--save_head", str(tmp_path / "head")]
    with pytest.raises(SystemExit, match="--save_head needs a MATPAC encoder, got a 'audio-spectrogram-transformer'"):
        run_probe.main([*args, "--model_name_or_path", str(ast), "--output_dir", str(tmp_path / "ast-out"), *FAST])
    assert not (tmp_path / "ast-out").exists()

    def failing_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(run_probe, "save_classifier", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run_probe.main([*args, "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), *FAST])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["task"] for row in saved["results"]] == ["nsynth"] and len(saved["results"][0]["runs"]) == 2


def test_the_card_of_a_saved_head_names_the_fold_it_was_tested_on(tiny_model, tmp_path):
    """Before: 'fold 1' whatever the first fold with clips was."""
    esc50 = make_task("esc50", tmp_path / "ESC-50-master")
    for clip in (esc50 / "audio").glob("1-*.wav"):
        clip.unlink()
    args = ["--dataset", "esc50", "--data_dir", str(esc50), "--model_name_or_path", tiny_model, *FAST]
    results = run_probe.main([*args, "--output_dir", str(tmp_path / "out"), "--save_head", str(tmp_path / "head")])
    assert sorted(results[0].clips_per_split) == ["fold 2", "fold 3", "fold 4", "fold 5"]
    card = (tmp_path / "head" / "README.md").read_text()
    assert f"accuracy {results[0].fold_scores[0][0]:.2f} % on fold 2 (this probe, the first of the run)" in card


def test_save_head_never_writes_over_another_model(tiny_model, data_root, tmp_path):
    """Before: `--save_head` at the encoder's folder replaced its checkpoint (teachers, predictor) by the probe."""
    output = ["--output_dir", str(tmp_path / "out")]
    args = ["--dataset", "nsynth", "--data_dir", str(data_root / "nsynth"), *output]
    encoder_files = {path.name: path.stat().st_mtime_ns for path in Path(tiny_model).iterdir()}
    with pytest.raises(SystemExit, match="--save_head '.*' is the encoder's own folder: the probe would overwrite"):
        run_probe.main([*args, "--model_name_or_path", tiny_model, "--save_head", tiny_model, *FAST])
    assert {path.name: path.stat().st_mtime_ns for path in Path(tiny_model).iterdir()} == encoder_files
    other = tmp_path / "pretraining-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["MatpacForPreTraining"]}))
    (other / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(
        SystemExit, match="holds files that are not a saved probe \\(config.json, model.safetensors\\)"
    ):
        run_probe.main([*args, "--model_name_or_path", tiny_model, "--save_head", str(other), *FAST])
    (tmp_path / "heads" / "nsynth").mkdir(parents=True)
    (tmp_path / "heads" / "nsynth" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="heads/nsynth' holds files that are not a saved probe \\(notes.txt\\)"):
        run_probe.main(["--all", "--data_dir", str(data_root), "--save_head", str(tmp_path / "heads"), *output])
    assert not (tmp_path / "out").exists()
    # An earlier probe is replaced, as a rerun expects.
    (other / "config.json").write_text(json.dumps({"architectures": ["MatpacForAudioClassification"]}))
    check_head_folder(other, tiny_model)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "esc100"], "argument --dataset: invalid choice: 'esc100'"),
        (
            ["--dataset", "esc50", "--task", "esc50"],
            "Some specified arguments are not used by the HfArgumentParser: ['--task', 'esc50']",
        ),
        # Before: tracebacks (a split size of 0, a None best probe, an empty list of runs, torch's device errors), or
        # a probe that never trained reported at chance level, or a validation fraction that did not apply.
        (["--dataset", "esc50", "--batch_size", "0"], "batch_size must be at least 1, got 0."),
        (["--dataset", "esc50", "--max_epochs", "0"], "max_epochs must be at least 1, got 0."),
        (["--dataset", "esc50", "--num_runs", "0"], "num_runs must be at least 1, got 0."),
        (["--dataset", "esc50", "--learning_rate", "0"], "learning_rate must be positive and finite, got 0."),
        (["--dataset", "esc50", "--learning_rate", "inf"], "learning_rate must be positive and finite, got inf."),
        (
            ["--dataset", "esc50", "--seed", "99999999999"],
            "seed must be between 0 and 2**32 - num_runs, got 99999999999.",
        ),
        (["--dataset", "esc50", "--valid_fraction", "1"], "valid_fraction must be between 0 and 1, got 1."),
        (["--dataset", "esc50", "--device", "gpu"], "device 'gpu' is not a torch device"),
        (["--dataset", "esc50", "--device", "meta"], "device 'meta' holds no data"),
        (["--dataset", "esc50", "--extraction_batch_size", "0"], "extraction_batch_size must be at least 1, got 0."),
    ],
)
def test_bad_flags_are_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_probe.main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f".py: error: {message}" in error.splitlines()[-1]
    assert "Traceback" not in error


def test_command_line(tiny_model, data_root, tmp_path):
    command = [
        sys.executable,
        "run_probe.py",
        "--dataset",
        "gtzan",
        "--data_dir",
        str(data_root / "gtzan"),
        "--model_name_or_path",
        tiny_model,
        "--output_dir",
        str(tmp_path),
        *FAST,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "| gtzan | accuracy |" in done.stdout and "| 85.3 |" in done.stdout
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["num_clips"] == 24


def test_clip_counts_decide_between_probing_and_failing(tiny_model, data_root, tmp_path, monkeypatch):
    from dataclasses import replace

    from modeling_matpac.evaluation import tasks

    args = ["--model_name_or_path", tiny_model, "--output_dir", str(tmp_path), *FAST[:-1]]
    with pytest.raises(SystemExit, match=r"ESC-50: found fold 1: 3 .* has fold 1: 400 .* Pass --allow_incomplete"):
        run_probe.main(["--dataset", "esc50", "--data_dir", str(data_root / "ESC-50-master"), *args])

    # With the fake GTZAN's sizes as the complete ones, GTZAN is probed; under --all, every other task is listed
    # as skipped because its clips are incomplete.
    gtzan = replace(tasks.TASKS["gtzan"], expected_clips={"train": 12, "valid": 6, "test": 6})
    monkeypatch.setitem(tasks.TASKS, "gtzan", gtzan)
    results = run_probe.main(["--all", "--data_dir", str(data_root), *args])
    assert [(r.task, r.complete, r.num_clips) for r in results] == [("gtzan", True, 24)]
    table = (tmp_path / "results.md").read_text()
    assert "| train: 12 / valid: 6 / test: 6 | yes |" in table
    assert "| nsynth | - | skipped: NSynth (instrument family): found train: 12 / valid: 6 / test: 6 clips" in table
    skipped = json.loads((tmp_path / "results.json").read_text())["skipped"]
    assert sorted(skipped) == sorted(set(PAPER_TASKS) - {"gtzan"})
    assert "the complete dataset has train: 14,915 / test: 5,085" in skipped["openmic"]


def test_an_undecodable_clip_keeps_the_other_clips_annotation_masks(tiny_model, tmp_path, monkeypatch):
    """OpenMIC, one clip undecodable: the probe gets each remaining clip's own row of Y_mask, not its neighbour's."""
    root = make_task("openmic", tmp_path / "openmic-2018")
    with np.load(root / "openmic-2018.npz", allow_pickle=True) as npz:
        keys, y_mask = [str(key) for key in npz["sample_key"]], npz["Y_mask"]
    (root / "audio" / keys[3][:3] / f"{keys[3]}.ogg").write_bytes(b"OggS not audio")
    probed = []
    monkeypatch.setattr(run_probe, "evaluate", lambda data, *args: probed.append(data) or evaluate(data, *args))
    args = ["--dataset", "openmic", "--data_dir", str(root), "--model_name_or_path", tiny_model]
    (result,) = run_probe.main([*args, "--output_dir", str(tmp_path / "out"), *FAST])
    (data,) = probed
    assert result.num_clips == len(data) == 23 and keys[3] not in data.ids
    assert data.label_mask.shape == data.targets.shape == (23, 3)
    np.testing.assert_array_equal(data.label_mask, y_mask[[keys.index(clip) for clip in data.ids]])
    assert not np.array_equal(y_mask[3:23], y_mask[4:24])  # a shift by one row would show


def test_clips_that_do_not_decode_make_a_complete_copy_incomplete(tiny_model, tmp_path, monkeypatch):
    from dataclasses import replace

    from modeling_matpac.evaluation import tasks

    esc50 = replace(tasks.TASKS["esc50"], expected_clips=dict.fromkeys(range(1, 6), 3))
    monkeypatch.setitem(tasks.TASKS, "esc50", esc50)
    root = make_task("esc50", tmp_path / "ESC-50-master")
    (root / "audio/2-1021-A-1.wav").write_bytes(b"RIFF\x00\x00 not audio")  # present, so it passes the first check
    args = ["--dataset", "esc50", "--data_dir", str(root), "--model_name_or_path", tiny_model]
    with pytest.raises(SystemExit, match="found fold 1: 3 / fold 2: 2 / fold 3: 3 .* has fold 1: 3 / fold 2: 3"):
        run_probe.main([*args, "--output_dir", str(tmp_path / "out"), *FAST[:-1]])
    (result,) = run_probe.main([*args, "--output_dir", str(tmp_path / "out"), *FAST])
    assert result.num_clips == 14 and result.complete is False and result.clips_per_split["fold 2"] == 2
