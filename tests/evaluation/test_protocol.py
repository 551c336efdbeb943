"""The probe protocol: metrics against hand-computed values, the split rules, early stopping and the results table."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from modeling_matpac.evaluation.embeddings import Embeddings
from modeling_matpac.evaluation.probe import (
    ProbeSettings,
    _loss,
    accuracy,
    confidence_interval,
    evaluate,
    make_splits,
    mean_average_precision,
    score,
    train_probe,
)
from modeling_matpac.evaluation.report import results_markdown, task_result, write_results
from modeling_matpac.evaluation.tasks import AudioFiles, ProbeData, ProbeDataError


def fake_data(targets, fold=None, split=None, label_mask=None, classes=None) -> ProbeData:
    targets = np.asarray(targets)
    num_classes = targets.shape[1] if targets.ndim == 2 else int(targets.max()) + 1
    return ProbeData(
        task="fake",
        classes=classes or [f"c{i}" for i in range(num_classes)],
        ids=[str(i) for i in range(len(targets))],
        audio=AudioFiles([f"{i}.wav" for i in range(len(targets))]),
        targets=targets,
        fold=None if fold is None else np.asarray(fold),
        split=None if split is None else np.asarray(split),
        label_mask=label_mask,
    )


SCORES = np.array([[0.9, 0.2, 0.5], [0.8, 0.1, 0.5], [0.3, 0.3, 0.5], [0.1, 0.4, 0.5]])
TARGETS = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_mean_average_precision_by_hand():
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: its positive ranked 4th -> 1/4;
    # class 2 has no positive and is left out of the mean.
    assert mean_average_precision(TARGETS, SCORES) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 4) / 2)


def test_mean_average_precision_scores_only_annotated_pairs():
    mask = np.ones_like(TARGETS, dtype=bool)
    mask[1, 0] = False  # class 0 without the negative scored 0.8: positives ranked 1st and 2nd -> AP 1
    mask[3, 1] = False  # class 1 without the negative scored 0.4: its positive ranked 3rd -> AP 1/3
    assert mean_average_precision(TARGETS, SCORES, mask) == pytest.approx((1 + 1 / 3) / 2)
    # A class whose only positive is unannotated has no positive to score: it is left out, not averaged in as 0.
    targets, scores = np.column_stack([TARGETS, [0, 0, 1, 0]]), np.column_stack([SCORES, [0.5, 0.6, 0.7, 0.8]])
    mask = np.column_stack([mask, [True, True, False, True]])
    assert mean_average_precision(targets, scores, mask) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="No class has a positive"):
        mean_average_precision(np.zeros((3, 2)), np.ones((3, 2)))


def test_accuracy_and_task_metric_choice():
    scores = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert accuracy(np.array([0, 1, 2, 1]), scores) == 0.75
    single = fake_data([0, 1, 2, 1])
    assert score(single, np.arange(4), scores) == 0.75
    multi = fake_data(TARGETS, label_mask=np.ones_like(TARGETS, dtype=bool))
    multi.label_mask[3, 1] = False
    assert score(multi, np.arange(4), SCORES) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)


def test_confidence_interval_is_student_t():
    # t(0.975, 2 dof) = 4.302653; sem of [0.8, 0.9, 1.0] = 0.1 / sqrt(3)
    assert confidence_interval([0.8, 0.9, 1.0]) == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert confidence_interval([0.7]) == 0.0


def test_masked_bce_counts_annotated_pairs_only():
    logits, targets = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    # BCE(0, 1) = log 2; BCE(2, 0) = log(1 + e^2) = 2.126928
    assert _loss(logits, targets, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(2))
    assert _loss(logits, targets, None).item() == pytest.approx((math.log(2) + math.log(1 + math.e**2)) / 2)


def test_cross_validation_holds_out_each_fold_and_draws_validation_from_the_others():
    targets = np.tile(np.repeat([0, 1, 2], 4), 5)  # 5 folds x 3 classes x 4 clips
    data = fake_data(targets, fold=np.repeat([1, 2, 3, 4, 5], 12))
    splits = make_splits(data, seed=3)
    assert [split.name for split in splits] == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    for fold, split in enumerate(splits, start=1):
        np.testing.assert_array_equal(split.test, np.flatnonzero(data.fold == fold))
        assert np.intersect1d(split.train, split.valid).size == 0
        assert sorted(np.concatenate([split.train, split.valid])) == sorted(np.flatnonzero(data.fold != fold))
        assert len(split.valid) == 5  # ceil(10 % of 48)
        assert set(targets[split.valid]) == {0, 1, 2}  # stratified: every class is validated
    # Stratified for every seed, not by luck: 16 clips per class leave 5 validation clips, 2 + 2 + 1 by class.
    for seed in range(10):
        for split in make_splits(data, seed=seed):
            assert sorted(np.bincount(targets[split.valid], minlength=3).tolist()) == [1, 2, 2], (seed, split.name)
    again, other = make_splits(data, seed=3), make_splits(data, seed=4)
    np.testing.assert_array_equal(splits[0].valid, again[0].valid)
    assert any(not np.array_equal(a.valid, b.valid) for a, b in zip(splits, other))


def test_a_validation_set_that_cannot_be_stratified_is_drawn_anyway_and_said_once(caplog):
    """Before: only a debug line said so. Class 2 has one clip, in fold 1: the other folds cannot stratify by it."""
    targets = np.array([0, 1] * 10 + [2])
    fold = np.array([1, 2, 3, 4, 5] * 4 + [1])
    data = fake_data(targets, fold=fold)
    splits = make_splits(data, seed=0)
    assert [split.unstratified for split in splits] == [False, True, True, True, True]
    for split in splits:  # still a partition of the other folds
        assert sorted(np.concatenate([split.train, split.valid])) == sorted(
            np.flatnonzero(fold != int(split.name[4:]))
        )
    embeddings = np.random.default_rng(0).normal(size=(21, 4)) + targets[:, None]
    with caplog.at_level(logging.WARNING):
        evaluate(data, embeddings, ProbeSettings(num_runs=2, max_epochs=2, patience=1))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        "fake: 4 of 5 validation sets were drawn without stratification (a class with a single training clip, or "
        "fewer validation clips than classes): early stopping may not see every class."
    ]


def test_official_split_is_used_and_a_missing_validation_set_is_carved_from_train():
    targets = np.array([0, 1] * 10)
    split = np.array(["train"] * 12 + ["valid"] * 4 + ["test"] * 4)
    (official,) = make_splits(fake_data(targets, split=split), seed=0)
    np.testing.assert_array_equal(official.train, np.arange(12))
    np.testing.assert_array_equal(official.valid, np.arange(12, 16))
    np.testing.assert_array_equal(official.test, np.arange(16, 20))

    split = np.array(["train"] * 16 + ["test"] * 4)  # OpenMIC has train/test only
    (carved,) = make_splits(fake_data(targets, split=split), seed=0, valid_fraction=0.25)
    assert len(carved.valid) == 4 and set(carved.valid) < set(range(16))
    assert sorted(np.concatenate([carved.train, carved.valid])) == list(range(16))
    with pytest.raises(ProbeDataError, match="0 test clips"):
        make_splits(fake_data(targets, split=np.array(["train"] * 20)), seed=0)
    # Before: scikit-learn's message about an empty train set, with its traceback.
    with pytest.raises(ProbeDataError, match="fake: 2 training clips cannot give up a validation share of 0.9"):
        make_splits(fake_data([0, 1, 0, 1], split=np.array(["train"] * 2 + ["test"] * 2)), seed=0, valid_fraction=0.9)


def noisy_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(60, 8))
    y = (x[:, 0] + rng.normal(0, 2.0, 60) > 3).astype(np.int64)
    return x[:40], y[:40], x[40:], y[40:]


def test_early_stopping_keeps_the_best_epoch():
    x_train, y_train, x_valid, y_valid = noisy_problem()
    settings = ProbeSettings(learning_rate=0.01, batch_size=8, max_epochs=60, patience=5)
    probe = train_probe(x_train, y_train, x_valid, y_valid, 2, settings, seed=1)
    losses = probe.valid_losses
    assert probe.best_epoch == int(np.argmin(losses)) + 1 > 1
    assert len(losses) == probe.best_epoch + settings.patience < settings.max_epochs  # stopped early
    # The returned weights are those of the best epoch, not of the last one.
    probabilities = probe.scores(x_valid)[np.arange(len(y_valid)), y_valid]
    assert -np.log(probabilities).mean() == pytest.approx(losses[probe.best_epoch - 1], rel=1e-5)
    assert losses[probe.best_epoch - 1] < losses[-1]
    capped = ProbeSettings(learning_rate=0.01, batch_size=8, max_epochs=probe.best_epoch, patience=10**6)
    np.testing.assert_array_equal(
        train_probe(x_train, y_train, x_valid, y_valid, 2, capped, seed=1).weight, probe.weight
    )


def test_a_probe_whose_validation_loss_is_never_finite_fails_clearly():
    """Before: `TypeError: 'NoneType' object is not subscriptable`, as no epoch had a best state."""
    x_train, y_train, x_valid, y_valid = noisy_problem()
    x_valid[0, 0] = 1e300  # finite in float64, infinite in the probe's float32
    with pytest.raises(ValueError, match="validation loss was never finite \\(nan\\): lower --learning_rate"):
        train_probe(x_train, y_train, x_valid, y_valid, 2, ProbeSettings(max_epochs=3), seed=1)


def test_probe_standardises_with_training_statistics_and_folds_them_into_the_layer():
    x_train, y_train, x_valid, y_valid = noisy_problem()
    probe = train_probe(x_train, y_train, x_valid, y_valid, 2, ProbeSettings(max_epochs=3), seed=0)
    np.testing.assert_allclose(probe.mean, x_train.mean(0))
    np.testing.assert_allclose(probe.scale, x_train.std(0))
    weight, bias = probe.folded()
    raw_logits = torch.from_numpy(x_valid @ weight.T + bias)
    np.testing.assert_allclose(raw_logits.softmax(-1).numpy(), probe.scores(x_valid), atol=1e-10)


def test_evaluate_is_reproducible_and_runs_differ_by_seed():
    """Pins the scores of this seed and data: each run's score is the mean of its folds (not their median)."""
    rng = np.random.default_rng(0)
    targets = np.tile(np.repeat([0, 1], 5), 3)
    embeddings = rng.normal(size=(30, 6)) + targets[:, None]
    data = fake_data(targets, fold=np.repeat([1, 2, 3], 10))
    settings = ProbeSettings(num_runs=3, max_epochs=20, patience=3, learning_rate=0.01)
    first, second = evaluate(data, embeddings, settings), evaluate(data, embeddings, settings)
    assert first.run_scores == second.run_scores and len(first.run_scores) == 3
    # Accuracies on 10 test clips per fold; runs 2 and 3 have folds whose median is not their mean.
    np.testing.assert_allclose(first.fold_scores, [[0.8, 0.7, 0.6], [1.0, 1.0, 0.8], [1.0, 0.9, 0.6]])
    assert first.run_scores == pytest.approx([0.7, 2.8 / 3, 2.5 / 3])
    for run, folds in zip(first.run_scores, first.fold_scores):
        assert run == pytest.approx(np.mean(folds))
    assert len(set(first.run_scores)) == 3  # each run draws its own validation sets and initialisation


def test_results_table_and_files(tmp_path):
    """Asymmetric runs, whose median (90) is not their mean: the row reports the mean and its Student-t interval."""
    data = fake_data([0, 1, 0, 1])
    outcome = type(
        "Outcome", (), {"run_scores": [0.7, 0.9, 1.0], "fold_scores": [[0.7], [0.9], [1.0]], "seconds": 1.25}
    )
    embeddings = Embeddings(np.zeros((4, 3840), np.float32), np.arange(4), seconds=12.0, cached=True)
    result = task_result(data, outcome, embeddings, paper=93.5)
    # mean (70 + 90 + 100) / 3 = 86.6667; t(0.975, 2 dof) = 4.302653 times the standard error = 37.9458
    assert result.mean == pytest.approx(260 / 3)
    sem = np.std([70, 90, 100], ddof=1) / math.sqrt(3)
    assert result.ci95 == pytest.approx(4.302653 * sem, rel=1e-6) and result.ci95 == pytest.approx(37.9458, abs=1e-4)
    table = results_markdown([result])
    assert "| fake | accuracy | 86.67 ± 37.95 | 93.5 | 3 | 1 | 4 | 3840 | 12.0 (cached) | 1.2 |  | - |" in table
    assert result.complete is None  # no published sizes to be complete against: "-", neither yes nor no
    json_path, markdown_path = write_results([result], tmp_path, {"probe": {"learning_rate": 1e-4}})
    saved = json.loads(json_path.read_text())
    assert saved["settings"]["probe"]["learning_rate"] == 1e-4
    assert saved["results"][0]["runs"] == pytest.approx([70.0, 90.0, 100.0])
    assert saved["results"][0]["mean"] == pytest.approx(260 / 3)
    assert markdown_path.read_text().strip() == table
    assert saved["results"][0]["complete"] is None

    # A task of the registry without published sizes (audiofolder): the same "-", whatever its clip counts.
    folder = fake_data([0, 1, 0, 1], split=["train", "train", "test", "test"])
    folder.task = "audiofolder"
    row = task_result(folder, outcome, embeddings, paper=None)
    assert (row.clips_per_split, row.complete) == ({"train": 2, "test": 2}, None)
    assert results_markdown([row]).endswith("| train: 2 / test: 2 | - |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_a_gpu_is_refused_before_any_work():
    with pytest.raises(ValueError, match="device 'cuda:0', but no CUDA device is available"):
        ProbeSettings(device="cuda:0")
