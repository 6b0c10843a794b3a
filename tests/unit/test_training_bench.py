"""bench.training's arithmetic on made-up runs: padding fraction, per-variant summary, the
comparisons (against TRL, packed against padded), the top-level ratios and the goals; and the
forward hook that counts what TRL's policy forwards. The real harness runs in test_bench_smoke."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bench.training import report
from bench.training.benchmark import ratios, summarize
from bench.training.variants import ForwardCounter, RunResult, padding_fraction

VARIANTS = ("ours_dpo", "ours_dpo_padded", "trl_dpo", "ours_bapo", "ours_bapo_padded")
# per variant: (training-loop CPU seconds in rounds 1 and 2, peak RSS MiB, tokens, positions)
FIGURES = {
    "ours_dpo": ((2.0, 4.0), 500.0, 300, 320),
    "ours_dpo_padded": ((3.0, 5.0), 520.0, 400, 500),
    "trl_dpo": ((5.0, 8.0), 800.0, 400, 480),
    "ours_bapo": ((4.0, 6.0), 600.0, 360, 400),
    "ours_bapo_padded": ((6.0, 9.0), 650.0, 560, 800),
}
PAIR_TOKENS = 400


def fake_run(variant: str, round_index: int) -> dict[str, Any]:
    cpu, rss, tokens, positions = FIGURES[variant]
    loop = cpu[round_index - 1]
    result = RunResult(
        variant=variant, label=f"round {round_index}", num_pairs=8, epochs=2, steps=4,
        epoch_pair_tokens=PAIR_TOKENS // 2, pair_tokens=PAIR_TOKENS, forwarded_tokens=tokens,
        forwarded_positions=positions, train_loop_s=loop * 1.5, train_loop_cpu_s=loop,
        wall_s=loop + 10, phases_s={"training": loop}, peak_rss_mib=rss + round_index,
        rss_at_train_start_mib=rss / 2, cuda_peak_mib=None, threads=1,
        mean_tokens={"prompt": 10.0, "chosen": 8.0, "rejected": 4.0}
        | ({"base": 6.0} if "bapo" in variant else {}),
    )  # fmt: skip
    return {**result.to_json(), "round": round_index}


def fake_summary() -> dict[str, Any]:
    runs = [fake_run(v, r) for r in (1, 2) for v in VARIANTS]
    return summarize(runs, retrain=None)


def test_padding_fraction_is_the_share_of_positions_without_a_real_token() -> None:
    assert padding_fraction(300, 400) == pytest.approx(0.25)
    assert padding_fraction(400, 400) == 0.0
    assert math.isnan(padding_fraction(0, 0))
    data = fake_run("ours_bapo_padded", 1)
    assert data["padding_fraction"] == pytest.approx(1 - 560 / 800)
    assert data["positions_per_pair"] == pytest.approx(800 / (8 * 2))


def test_summary_has_positions_and_padding_per_variant_and_packed_vs_padded() -> None:
    summary = fake_summary()
    bapo = summary["variants"]["ours_bapo"]
    assert bapo["forwarded_positions"] == 400 and bapo["positions_per_pair"] == 25.0
    assert bapo["padding_fraction"] == pytest.approx(0.1)
    comps = summary["comparisons"]
    assert set(comps) == {
        "ours_dpo_vs_trl_dpo",
        "ours_bapo_vs_trl_dpo",
        "ours_bapo_vs_ours_bapo_padded",
        "ours_dpo_vs_ours_dpo_padded",
    }
    packed = comps["ours_bapo_vs_ours_bapo_padded"]
    assert packed["cpu_throughput_ratio_per_round"] == pytest.approx([6 / 4, 9 / 6])
    assert packed["cpu_throughput_ratio"] == pytest.approx(1.5)
    assert packed["wall_speedup_first"] == pytest.approx(16 / 14)
    assert packed["peak_rss_ratio_per_round"] == pytest.approx([601 / 651, 602 / 652])
    assert math.isnan(packed["cuda_peak_ratio"])


def test_top_level_ratios_are_the_cpu_time_comparisons_and_memory_of_ours_over_trl() -> None:
    summary = fake_summary()
    headline = ratios(summary)
    assert headline["bapo_vs_trl_dpo"] == pytest.approx(median_of(5 / 4, 8 / 6))
    assert headline["dpo_vs_trl_dpo"] == pytest.approx(median_of(5 / 2, 8 / 4))
    assert (
        headline["bapo_vs_trl_dpo"]
        == summary["comparisons"]["ours_bapo_vs_trl_dpo"]["cpu_throughput_ratio"]
    )
    assert math.isnan(headline["dpo_vs_trl_dpo_live_ref"])  # TRL's default did not run
    assert headline["peak_memory_vs_trl_dpo"] == pytest.approx(median_of(601 / 801, 602 / 802))
    assert headline["peak_memory_dpo_vs_trl_dpo"] == pytest.approx(median_of(501 / 801, 502 / 802))
    assert headline["padding_fraction"] == pytest.approx(
        {v: 1 - FIGURES[v][2] / FIGURES[v][3] for v in VARIANTS}
    )
    assert headline["packed_vs_padded"] == pytest.approx({"bapo": 1.5, "dpo": median_of(1.5, 1.25)})
    gpu = ratios(summary, "cuda")  # wall clock; no CUDA memory measured in these runs
    assert (
        gpu["bapo_vs_trl_dpo"] == summary["comparisons"]["ours_bapo_vs_trl_dpo"]["throughput_ratio"]
    )
    assert math.isnan(gpu["peak_memory_vs_trl_dpo"])


def median_of(a: float, b: float) -> float:
    return (a + b) / 2


def test_goals_include_peak_memory_and_the_notes_use_the_measured_layout() -> None:
    summary = fake_summary()
    config = {"base_max_new_tokens": 64, "packing": True}
    goals = report.goals(summary, config, "cpu")
    by_name = {g.name: g for g in goals}
    dpo = by_name["our DPO / TRL DPO, pair tokens per CPU-second"]
    bapo = by_name["our BAPO / TRL DPO, pair tokens per CPU-second"]
    memory = by_name["our BAPO / TRL DPO, peak RSS"]
    assert (dpo.target, bapo.target, memory.target, memory.direction) == (2.0, 1.2, 1.0, "<=")
    assert memory.met is True
    assert bapo.met is True and "base answer" not in bapo.note  # met: no explanation
    assert dpo.met is True
    slow = fake_summary()
    for comp in slow["comparisons"].values():
        comp["cpu_throughput_ratio"] = 0.5
    notes = {g.name: g.note for g in report.goals(slow, config, "cpu")}
    bapo_note = notes["our BAPO / TRL DPO, pair tokens per CPU-second"]
    dpo_note = notes["our DPO / TRL DPO, pair tokens per CPU-second"]
    assert "padded to the longest" not in bapo_note and "25 positions per pair" in bapo_note
    assert "packed" in bapo_note and "10% padding" in bapo_note
    assert "our DPO forwards 20 positions per pair" in dpo_note and "TRL 30 positions" in dpo_note
    assert "its prompt once" in dpo_note
    text = report.ratios_text(ratios(summary), "cpu")
    assert "| our BAPO / TRL DPO, peak memory | 0.75 | ≤ 1.00 |" in text


def test_forward_counter_counts_training_forwards_with_gradients_only() -> None:
    class Policy(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
            return input_ids

    policy, counter = Policy(), ForwardCounter()
    policy.register_forward_pre_hook(counter, with_kwargs=True)
    ids = torch.ones(4, 5, dtype=torch.long)  # [2B, T]: chosen rows, then rejected rows
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0], [1] * 2 + [0] * 3])
    policy.train()
    policy(input_ids=ids, attention_mask=mask)  # TRL's call: keyword arguments
    policy(ids)  # positional, no mask: every position counts as a token
    with torch.no_grad():
        policy(input_ids=ids, attention_mask=mask)  # a live reference forward
    policy.eval()
    policy(input_ids=ids, attention_mask=mask)  # evaluation
    assert (counter.calls, counter.positions, counter.tokens) == (2, 40, 14 + 20)
