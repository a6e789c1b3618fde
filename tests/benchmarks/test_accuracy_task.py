"""benchmarks/accuracy: the committed task file is what make_task.py writes, every question is
well-formed for lm-eval's multiple_choice, and run.py's comparison counts what it says."""

from __future__ import annotations

import json

from benchmarks.accuracy import make_task
from benchmarks.accuracy.run import compare


def test_committed_task_file_is_reproducible():
    committed = [json.loads(line) for line in make_task.OUT.read_text().splitlines()]
    assert committed == make_task.make_items()


def test_every_question_has_four_distinct_choices_and_a_valid_answer():
    items = make_task.make_items()
    assert len(items) > 200
    for item in items:
        assert item["question"].startswith("Question: ") and item["question"].endswith("Answer:")
        assert len(set(item["choices"])) == make_task.NUM_CHOICES == len(item["choices"])
        assert 0 <= item["answer"] < make_task.NUM_CHOICES


def test_compare_reports_accuracy_shift_loglikelihood_gaps_and_changed_answers():
    reference = {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.5,
                 "loglikelihoods": {0: [-1.0, -2.0], 1: [-3.0, -1.0]}, "picks": {0: 0, 1: 1}}
    run = {"acc": 0.25, "acc_stderr": 0.1, "acc_norm": 0.5,
           "loglikelihoods": {0: [-1.5, -1.0], 1: [-3.0, -1.0]}, "picks": {0: 1, 1: 1}}
    row = compare(run, reference)
    assert row["acc_points_vs_reference"] == -25.0
    assert row["answers_changed"] == 1
    assert row["mean_abs_loglikelihood_diff"] == 1.5 / 4
    assert row["max_abs_loglikelihood_diff"] == 1.0
