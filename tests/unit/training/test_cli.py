"""The `bapo` CLI: bad input fails fast with one line and exit 2; train + eval round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import main

GOOD = {"prompt": "What do bees make?", "chosen": "Arr, honey!", "rejected": "Bees make honey."}


def _write_pairs(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _fail(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    """Run main(argv); expect exit 2 and exactly one stderr line containing `message`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(GOOD), "{not json"], "pairs.jsonl:2: invalid JSON"),
        ([json.dumps({"prompt": "p", "chosen": "a"})], "pairs.jsonl:1: 'rejected'"),
        (
            [json.dumps({**GOOD, "rejected": GOOD["chosen"]})],
            "pairs.jsonl:1: chosen: chosen and rejected are identical",
        ),
        (["", "  "], "no pairs"),
    ],
)
def test_bad_pairs_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], message: str
) -> None:
    pairs = _write_pairs(tmp_path / "pairs.jsonl", *lines)
    out = tmp_path / "adapter"
    _fail(capsys, ["train", "--pairs", str(pairs), "--out", str(out)], message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "ipo"], "invalid choice: 'ipo'"),
        (["--anchor-form", "cubic"], "invalid choice: 'cubic'"),
        (["--rank", "4"], "lora_rank must be one of"),
        (["--beta", "0"], "beta must be > 0"),
        (["--epochs", "2", "--max-steps", "3"], "not allowed with argument"),
    ],
)
def test_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    pairs = _write_pairs(tmp_path / "pairs.jsonl", json.dumps(GOOD))
    cache = tmp_path / "cache.json"
    argv = ["train", "--pairs", str(pairs), "--out", str(tmp_path / "a"), "--cache", str(cache)]
    _fail(capsys, argv + extra, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_unreadable_pairs_and_taken_out_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    _fail(capsys, ["train", "--pairs", str(missing), "--out", str(tmp_path / "a")], "cannot read")
    pairs = _write_pairs(tmp_path / "pairs.jsonl", json.dumps(GOOD))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "adapter_model.safetensors").write_text("old")
    _fail(capsys, ["train", "--pairs", str(pairs), "--out", str(taken)], "exists and is not empty")
    assert [p.name for p in taken.iterdir()] == ["adapter_model.safetensors"]


def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = _write_pairs(tmp_path / "pairs.jsonl", json.dumps(GOOD))
    config = tmp_path / "config.json"
    argv = ["train", "--pairs", str(pairs), "--out", str(tmp_path / "a"), "--config", str(config)]
    config.write_text("[1]")
    _fail(capsys, argv, "must hold a JSON object")
    config.write_text('{"learning_rat": 0.1}')
    _fail(capsys, argv, "unknown hyperparameter(s): learning_rat")
    assert not (tmp_path / "a").exists()


def test_bad_eval_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fail(capsys, ["eval", "--adapter", str(tmp_path)], "no adapter_config.json")
    bad_mc = tmp_path / "mc.jsonl"
    bad_mc.write_text('{"question": "Q"}\n')
    out = tmp_path / "result.json"
    _fail(capsys, ["eval", "--adapter", "none", "--mc", str(bad_mc), "--out", str(out)],
          "mc.jsonl:1: not an ARC record")  # fmt: skip
    _fail(capsys, ["eval", "--adapter", "none", "--limit", "0"], "--limit must be >= 1")
    assert not out.exists()


def test_console_script_reports_bad_input(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "bapo"
    if not script.exists():
        pytest.skip("console script not installed")
    pairs = _write_pairs(tmp_path / "pairs.jsonl", "[1]")
    run = subprocess.run(
        [str(script), "train", "--pairs", str(pairs), "--out", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"bapo train: error: {pairs}:1: a pair must be a JSON object\n"


@pytest.mark.slow
def test_train_then_eval_round_trip(
    tmp_path: Path, data_dir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [GOOD, {"prompt": "What color is grass?", "chosen": "Arr, green!",
                   "rejected": "Grass is green."}]  # fmt: skip
    pairs = _write_pairs(tmp_path / "pairs.jsonl", *(json.dumps(r) for r in rows))
    adapter, cache = tmp_path / "adapter", tmp_path / "cache.json"
    assert main([
        "train", "--pairs", str(pairs), "--out", str(adapter), "--data-dir", str(data_dir),
        "--max-steps", "2", "--lr", "5e-3", "--rank", "8", "--cache", str(cache),
        "--max-prompt-tokens", "64", "--max-response-tokens", "16", "--base-max-new-tokens", "8",
    ]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["cache_stats"]["base_computed"] == 2
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "metrics.json").read_text())["history"][1]["step"] == 2
    assert len(json.loads(cache.read_text())) == 2 + 6  # 2 base answers + 6 ref log-probs

    mc = tmp_path / "mc.jsonl"
    choices = {"text": ["3", "2"], "label": ["A", "B"]}
    mc.write_text(json.dumps({"question": "What is 1 + 1?", "answerKey": "B", "choices": choices}))
    result_file = tmp_path / "eval.json"
    argv = ["eval", "--adapter", str(adapter), "--mc", str(mc), "--data-dir", str(data_dir)]
    assert main([*argv, "--out", str(result_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(result_file.read_text())
    assert printed["base"]["n"] == printed["adapter"]["n"] == 1
    assert printed["delta"] == printed["adapter"]["accuracy"] - printed["base"]["accuracy"]
