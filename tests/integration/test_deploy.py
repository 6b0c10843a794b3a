"""Deployment files: compose validates and is wired as documented; the Dockerfile lints clean."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _env_file(tmp_path: Path) -> Path:
    env = (ROOT / ".env.example").read_text()
    env = env.replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=pw-for-the-test\n")
    env = env.replace("OPERATOR_KEY=\n", "OPERATOR_KEY=operator-key-for-the-test\n")
    path = tmp_path / ".env"
    path.write_text(env)
    return path


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file as a real compose implementation resolves it."""
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package) is needed; `make test` installs it"
    env_file = _env_file(tmp_path_factory.mktemp("compose"))
    done = subprocess.run(
        [tool, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout))


def test_compose_requires_its_secrets(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    assert tool
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = subprocess.run(
        [tool, "--env-file", str(empty), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr


def test_services_are_all_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker",
        "ops-worker",
        "beat",
        "vllm",
        "prepare-model",
    }


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_every_command_refers_to_code_that_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert (ROOT / "alembic.ini").exists()
    assert services["api"]["command"][:2] == ["python", "-m"]
    assert _module_exists(services["api"]["command"][2])
    for name in ("worker", "ops-worker", "beat"):
        command = services[name]["command"]
        assert command[0] == "celery" and command[1] == "-A"
        assert _module_exists(command[2]), command[2]
    assert "gpu" in services["worker"]["command"]
    assert "default" in services["ops-worker"]["command"]  # the reaper and due-retrain tasks
    prepare = services["prepare-model"]["command"]
    assert prepare[:2] == ["bapo", "prepare-model"]
    from worker.cli import build_parser

    build_parser().parse_args(prepare[1:])  # the CLI accepts exactly these arguments


def test_vllm_is_internal_and_lora_ready(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    assert "ports" not in vllm
    assert compose["networks"]["internal"]["internal"] is True
    assert set(vllm["networks"]) == {"internal"}
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    for flag in ("--enable-lora", "--max-loras", "--max-lora-rank", "--max-cpu-loras"):
        assert flag in vllm["command"]
    assert ":" in vllm["image"] and not vllm["image"].endswith(":latest")
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_only_the_api_is_published(compose: dict[str, Any]) -> None:
    published = {name for name, svc in compose["services"].items() if svc.get("ports")}
    assert published == {"api"}


def _mount(service: dict[str, Any], volume: str) -> str:
    for mount in service.get("volumes", []):
        if isinstance(mount, str):  # docker-compose 1.x prints the short syntax
            parts = mount.split(":")
            mount = {"source": parts[0], "target": parts[1]}
        if mount.get("source") == volume:
            return str(mount["target"])
    raise AssertionError(f"{volume} not mounted")


def test_adapter_and_model_volumes_are_shared_at_the_same_path(compose: dict[str, Any]) -> None:
    services = compose["services"]
    adapter_paths = {_mount(services[name], "adapters") for name in ("api", "worker", "vllm")}
    model_paths = {_mount(services[name], "models") for name in ("worker", "vllm", "prepare-model")}
    assert adapter_paths == {"/data/adapters"}
    assert model_paths == {"/data/models"}
    assert services["worker"]["environment"]["ADAPTER_DIR"] == "/data/adapters"


def test_startup_is_ordered_on_health(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]["depends_on"]
    assert api["migrate"]["condition"] == "service_completed_successfully"
    assert api["vllm"]["condition"] == "service_healthy"
    assert (
        compose["services"]["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    )
    for name in ("postgres", "redis", "vllm"):
        assert "healthcheck" in compose["services"][name]


def test_env_example_documents_every_compose_variable() -> None:
    import re

    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used - documented == set()


def test_dockerfile_lints_clean_and_uses_the_pins() -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv/bin/hadolint")
    done = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line or "==" in line for line in installs)
    assert "AS api" in text and "AS worker" in text and "HEALTHCHECK" in text
    assert "USER 10001" in text
    api_stage = text.split("AS api")[1].split("AS worker")[0]
    assert "[ml]" not in api_stage  # the API image has no torch
