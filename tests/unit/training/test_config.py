"""Hyperparameters, schedule, step counting and the held-out split (no model needed)."""

from __future__ import annotations

import itertools

import pytest

from foundation.train_config import ConfigError, TrainConfig
from worker.training.trainer import lr_factor, split_heldout, total_steps


def test_defaults_are_valid_and_round_trip_through_a_dict() -> None:
    config = TrainConfig().validate()
    assert TrainConfig.parse(config.to_dict()) == config
    assert config.lora_rank in (1, 8, 16, 32, 64, 128, 256, 320, 512)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_rank": 4}, "lora_rank"),
        ({"method": "ipo"}, "method"),
        ({"anchor_form": "cubic"}, "anchor_form"),
        ({"beta": 0}, "beta"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_response_tokens": 0}, "max_response_tokens"),
        ({"epochs": "2"}, "epochs"),  # strict JSON types: a string is not a number
        ({"max_steps": 2.0}, "max_steps"),  # nor a float an int
    ],
)
def test_bad_values_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        TrainConfig.parse(changes)
    assert refused.value.field == message


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown hyperparameter") as refused:
        TrainConfig.parse({"learning_rat": 1e-4})
    assert refused.value.field == "learning_rat"
    # the served model's name is the deployment's (SERVED_MODEL_NAME), not a hyperparameter
    with pytest.raises(ConfigError, match="served_model_name"):
        TrainConfig.parse({"served_model_name": "x"})


def test_dpo_means_zero_anchor_weight() -> None:
    assert TrainConfig(method="dpo", anchor_weight=5.0).effective_anchor_weight == 0.0
    assert TrainConfig(method="bapo", anchor_weight=5.0).effective_anchor_weight == 5.0


def test_schedule_warms_up_then_decays() -> None:
    config = TrainConfig(warmup_ratio=0.2, lr_schedule="cosine")
    factors = [lr_factor(step, 10, config) for step in range(10)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3])
    assert factors[2] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(factors[2:]))
    assert factors[-1] > 0
    linear = TrainConfig(warmup_ratio=0.0, lr_schedule="linear")
    assert [lr_factor(s, 4, linear) for s in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])


def test_total_steps_from_epochs_or_max_steps() -> None:
    assert total_steps(10, TrainConfig(epochs=2, batch_size=4, grad_accum_steps=1)) == 6
    assert total_steps(10, TrainConfig(epochs=2, batch_size=4, grad_accum_steps=2)) == 4
    assert total_steps(10, TrainConfig(max_steps=7)) == 7


def test_heldout_split_is_seeded_and_only_with_enough_pairs() -> None:
    config = TrainConfig(heldout_fraction=0.2, min_pairs_for_heldout=10, seed=3)
    assert split_heldout(9, config) == (list(range(9)), [])
    train, heldout = split_heldout(20, config)
    assert len(heldout) == 4 and sorted(train + heldout) == list(range(20))
    assert split_heldout(20, config) == (train, heldout)
    assert split_heldout(20, TrainConfig(heldout_fraction=0.2, seed=4))[1] != heldout


def test_heldout_split_keeps_pairs_of_one_prompt_together() -> None:
    config = TrainConfig(heldout_fraction=0.25, min_pairs_for_heldout=4, seed=3)
    groups = ["a", "a", "a", "b", "b", "c", "c", "d", "e", "f", "f", "g"]
    train, heldout = split_heldout(len(groups), config, groups)
    assert sorted(train + heldout) == list(range(len(groups))) and heldout and train
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in heldout})
    assert split_heldout(len(groups), config, groups) == (train, heldout)  # seeded
    assert split_heldout(5, config, ["same"] * 5) == ([0, 1, 2, 3, 4], [])  # one prompt: no split
