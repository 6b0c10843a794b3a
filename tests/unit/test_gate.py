"""The retention gate's verdict, from figures built directly (the measurements are tested on the
real model in tests/unit/training/test_retention.py and through a worker job in
tests/integration/test_jobs_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import make_settings
from worker.gate import GateMeasures, gate_verdict, retention_threshold
from worker.training.retention import DegeneracyCheck, KnowledgeComparison, paired_difference

N = 300
BASE_RIGHT = 200  # the base model gets the first 200 of 300 questions right
FLUENT = DegeneracyCheck(prompts=12, adapter_degenerate=0, base_degenerate=0, nll_bound=3.5)


def _knowledge(lost: int, gained: int = 0, n: int = N) -> KnowledgeComparison:
    """An adapter that gets `lost` of the base's right answers wrong and `gained` of its wrong
    answers right, on n questions."""
    base = [1.0] * BASE_RIGHT + [0.0] * (n - BASE_RIGHT)
    adapter = list(base)
    for i in range(lost):
        adapter[i] = 0.0
    for i in range(gained):
        adapter[BASE_RIGHT + i] = 1.0
    delta, stderr = paired_difference(base, adapter)
    return KnowledgeComparison(n, sum(base) / n, sum(adapter) / n, delta, stderr)


def _degeneracy(adapter: int, base: int = 0, prompts: int = 12) -> DegeneracyCheck:
    return DegeneracyCheck(prompts, adapter, base, nll_bound=3.5)


def test_paired_stderr_is_the_sd_of_the_differences_over_root_n() -> None:
    delta, stderr = paired_difference([1, 1, 0, 0], [1, 0, 1, 0])
    assert delta == 0.0
    assert stderr == pytest.approx((2 / 3) ** 0.5 / 2)  # d = 0, −1, +1, 0: sd √(2/3), n 4
    assert paired_difference([1.0], [0.0]) == (-1.0, 0.0)
    assert paired_difference([], []) == (0.0, 0.0)


def test_a_harmless_adapter_that_loses_one_question_of_300_passes(tmp_path: Path) -> None:
    knowledge = _knowledge(lost=1)
    assert knowledge.delta == pytest.approx(-1 / 300)
    assert knowledge.stderr == pytest.approx(1 / 300)  # one −1 among 300: z = −1
    for floor in (-0.02, 0.0):  # passes on z alone, without the practical floor too
        settings = make_settings(tmp_path, gate_min_retention_delta=floor)
        verdict = gate_verdict(settings, GateMeasures(knowledge, FLUENT), anchor=-0.1)
        assert verdict.passed is True and verdict.reason is None
        assert verdict.retention_threshold == pytest.approx(min(-2 / 300, floor))


def test_a_drop_beyond_two_standard_errors_fails(tmp_path: Path) -> None:
    knowledge = _knowledge(lost=30, gained=5)  # −8.3 pts, paired stderr 1.9 pts: z ≈ −4.3
    assert knowledge.delta / knowledge.stderr < -4
    settings = make_settings(tmp_path)
    verdict = gate_verdict(settings, GateMeasures(knowledge, FLUENT), anchor=None)
    assert verdict.passed is False
    assert verdict.reason is not None and "knowledge retention -0.083 ± 0.019" in verdict.reason
    assert "GATE_RETENTION_Z" in verdict.reason and "300 questions" in verdict.reason
    assert verdict.retention_threshold == pytest.approx(-2 * knowledge.stderr)
    assert (verdict.mc_questions, verdict.retention_z) == (300, 2.0)
    assert verdict.base_accuracy == pytest.approx(200 / 300)
    assert verdict.adapter_accuracy == pytest.approx(175 / 300)


def test_the_same_size_of_drop_passes_when_it_is_within_noise(tmp_path: Path) -> None:
    noisy = _knowledge(lost=60, gained=51)  # −3 pts, but stderr 3.5 pts: z ≈ −0.9
    settings = make_settings(tmp_path)
    assert gate_verdict(settings, GateMeasures(noisy, FLUENT), anchor=None).passed is True
    clean = _knowledge(lost=9)  # the same −3 pts with nothing else moving: z ≈ −3
    assert gate_verdict(settings, GateMeasures(clean, FLUENT), anchor=None).passed is False


def test_the_practical_floor_keeps_significant_but_tiny_drops(tmp_path: Path) -> None:
    knowledge = _knowledge(lost=5)  # −1.7 pts at z ≈ −2.2: beyond 2 stderr, above the floor
    assert knowledge.delta / knowledge.stderr < -2
    default = make_settings(tmp_path)  # floor −0.02
    assert gate_verdict(default, GateMeasures(knowledge, FLUENT), anchor=None).passed is True
    no_floor = make_settings(tmp_path, gate_min_retention_delta=0.0)
    assert gate_verdict(no_floor, GateMeasures(knowledge, FLUENT), anchor=None).passed is False
    assert retention_threshold(default, knowledge.stderr) == -0.02


def test_degenerate_answers_fail_the_adapter_even_with_a_perfect_mc_score(
    tmp_path: Path,
) -> None:
    perfect = KnowledgeComparison(N, 0.8, 1.0, 0.2, 0.023)
    settings = make_settings(tmp_path)  # GATE_MAX_DEGENERATE_INCREASE 0.25
    broken = gate_verdict(settings, GateMeasures(perfect, _degeneracy(6)), anchor=None)
    assert broken.passed is False
    assert broken.reason is not None and "GATE_MAX_DEGENERATE_INCREASE" in broken.reason
    assert "degenerate answers on 6 of 12 general prompts" in broken.reason
    assert "knowledge" not in broken.reason
    assert (broken.degenerate_fraction, broken.base_degenerate_fraction) == (0.5, 0.0)
    assert (broken.max_degenerate_fraction, broken.gate_prompts) == (0.25, 12)
    at_margin = gate_verdict(settings, GateMeasures(perfect, _degeneracy(3)), anchor=None)
    assert at_margin.passed is True  # 3 of 12 = base + 0.25 exactly
    over = gate_verdict(settings, GateMeasures(perfect, _degeneracy(5, base=1)), anchor=None)
    assert over.passed is False  # 5/12 > 1/12 + 0.25


def test_every_failed_check_is_named(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, gate_max_anchor_drift=-5)
    verdict = gate_verdict(settings, GateMeasures(_knowledge(lost=40), _degeneracy(12)), -6.0)
    assert verdict.passed is False and verdict.reason is not None
    for setting in ("GATE_RETENTION_Z", "GATE_MAX_DEGENERATE_INCREASE", "GATE_MAX_ANCHOR_DRIFT"):
        assert setting in verdict.reason
    fine = gate_verdict(settings, GateMeasures(_knowledge(lost=0), FLUENT), None)
    assert fine.passed is True  # no base responses measured: no anchor check


def test_the_anchor_check_leaves_the_tolerance_forms_allowance_free(tmp_path: Path) -> None:
    from dataclasses import replace

    from foundation.train_config import TrainConfig
    from worker.gate import anchor_allowance

    settings = make_settings(tmp_path, gate_max_anchor_drift=-5)
    measures = GateMeasures(_knowledge(lost=0), FLUENT)
    tolerant = TrainConfig(anchor_form="hinge_tolerance", anchor_tolerance=32.0)
    assert anchor_allowance(tolerant) == 32.0
    assert anchor_allowance(replace(tolerant, anchor_form="hinge")) == 0.0
    assert gate_verdict(settings, measures, -20.0, anchor_allowance(tolerant)).passed is True
    beyond = gate_verdict(settings, measures, -40.0, anchor_allowance(tolerant))
    assert beyond.passed is False and beyond.reason and "tolerance 32" in beyond.reason
    assert gate_verdict(settings, measures, -20.0).passed is False  # the summed hinge: no allowance
