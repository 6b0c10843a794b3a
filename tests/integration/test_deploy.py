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


SECRETS = {
    "POSTGRES_PASSWORD": "pw-for-the-test",
    "OPERATOR_KEY": "operator-key-for-the-test",
    "VLLM_API_KEY": "vllm-key-for-the-test",
}


def _env_file(tmp_path: Path, **overrides: str) -> Path:
    """.env.example with the secrets filled in and `overrides` appended (later lines win)."""
    env = (ROOT / ".env.example").read_text()
    for name, value in SECRETS.items():
        env = env.replace(f"{name}=\n", f"{name}={value}\n")
    env += "".join(f"{name}={value}\n" for name, value in overrides.items())
    path = tmp_path / ".env"
    path.write_text(env)
    return path


def _config(env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package) is needed; `make test` installs it"
    return subprocess.run(
        [tool, "--env-file", str(env_file), "-f", str(COMPOSE), "config", *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _resolved(env_file: Path) -> dict[str, Any]:
    """The compose file as a real compose implementation resolves it with this .env."""
    done = _config(env_file)
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout))


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose file resolved with .env.example's values."""
    return _resolved(_env_file(tmp_path_factory.mktemp("compose")))


def test_compose_requires_its_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = _config(empty, "-q")
    assert done.returncode != 0 and "POSTGRES_PASSWORD" in done.stderr
    for name in SECRETS:  # each secret on its own: left empty, compose refuses to start
        done = _config(_env_file(tmp_path, **{name: ""}), "-q")
        assert done.returncode != 0 and name in done.stderr, (name, done.stderr)


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


def _devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return list(service["deploy"]["resources"]["reservations"]["devices"])


def test_gpu_services_get_their_own_devices(compose: dict[str, Any], tmp_path: Path) -> None:
    """`count: 1` on two services puts both on GPU 0; explicit ids keep training off vLLM's card."""
    services = compose["services"]
    ids = {}
    for name in ("worker", "vllm"):
        (device,) = _devices(services[name])
        assert "count" not in device and device["capabilities"] == ["gpu"], device
        ids[name] = device["device_ids"]
    assert ids == {"worker": ["0"], "vllm": ["1"]}
    assert _flag(services["vllm"]["command"], "--gpu-memory-utilization") == "0.9"
    # Sharing one card on purpose: the same id for both, and vLLM capped to half of it.
    shared = _resolved(
        _env_file(tmp_path, WORKER_GPU_IDS="2", VLLM_GPU_IDS="2", VLLM_GPU_MEMORY_UTILIZATION="0.5")
    )["services"]
    assert _devices(shared["worker"])[0]["device_ids"] == ["2"]
    assert _devices(shared["vllm"])[0]["device_ids"] == ["2"]
    assert _flag(shared["vllm"]["command"], "--gpu-memory-utilization") == "0.5"


def _flag(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, (flag, command)
    return command[command.index(flag) + 1]


# One-shot jobs and beat have nothing to ask; each disable is explained in docker-compose.yml.
HEALTHCHECK_DISABLED = {"migrate", "prepare-model", "beat"}


def _check(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _disabled(service: dict[str, Any]) -> bool:
    check = service["healthcheck"]
    return check.get("disable") is True or check.get("test") == ["NONE"]


def _ping_destination(check: str) -> str:
    """The node a `celery inspect ping` health check asks (it must name one)."""
    words = check.replace("$$", "$").split()
    assert "ping" in words, check
    for flag in ("-d", "--destination"):
        if flag in words:
            return words[words.index(flag) + 1].strip("\"'")
    raise AssertionError(f"pings any node, not its own: {check}")


def test_every_service_checks_its_own_health(compose: dict[str, Any]) -> None:
    """No service inherits the API image's :8000 check; workers ping their own node only."""
    services = compose["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check of its own"
        if name not in HEALTHCHECK_DISABLED:
            assert not _disabled(service), name
        if name != "api":
            assert "/healthz" not in _check(service), f"{name} checks the API's /healthz"
    assert {name for name, svc in services.items() if _disabled(svc)} == HEALTHCHECK_DISABLED
    assert "127.0.0.1:8000/healthz" in _check(services["api"])
    assert "127.0.0.1:8000/health" in _check(services["vllm"])
    assert "pg_isready" in _check(services["postgres"])
    assert "redis-cli ping" in _check(services["redis"])
    for name in ("worker", "ops-worker"):
        command = services[name]["command"]
        node = _flag(command, "--hostname").replace("%h", "$HOSTNAME")
        assert _ping_destination(_check(services[name])) == node, name


def test_the_worker_image_pings_its_own_node() -> None:
    text = (ROOT / "Dockerfile").read_text()
    worker_stage = text.split("AS worker")[1]
    check = worker_stage.split("HEALTHCHECK")[1].split("\nCMD")[0]
    assert _ping_destination(check) == "gpu@$HOSTNAME"


def test_vllm_requires_the_key_the_api_sends(compose: dict[str, Any]) -> None:
    """vLLM reads VLLM_API_KEY itself (= --api-key, kept off the process list)."""
    services = compose["services"]
    key = services["api"]["environment"]["VLLM_API_KEY"]
    assert key == SECRETS["VLLM_API_KEY"]
    assert services["vllm"]["environment"]["VLLM_API_KEY"] == key
    assert "--api-key" not in services["vllm"]["command"]  # would show the key in `ps`


def test_metrics_need_the_operator_key_in_compose(compose: dict[str, Any]) -> None:
    assert compose["services"]["api"]["environment"]["METRICS_REQUIRE_OPERATOR_KEY"] == "true"


def _stages(text: str) -> dict[str, list[str]]:
    """Each Dockerfile stage's instructions, its parent stage's first (continuations joined)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for instruction in text.replace("\\\n", " ").splitlines():
        words = instruction.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            parent = stages.get(words[1], [])
            current = stages.setdefault(words[-1], list(parent))
            continue
        current.append(instruction)
    return stages


def test_a_code_change_rebuilds_only_the_code_layer() -> None:
    """Dependencies (CUDA torch) install before any code is copied, in every stage."""
    stages = _stages((ROOT / "Dockerfile").read_text())
    code = ("app", "worker", "foundation", "migrations", ".")
    for name in ("api", "worker"):
        instructions = stages[name]
        deps = next(
            i
            for i, line in enumerate(instructions)
            if line.startswith("RUN") and "pip install" in line and "--no-deps ." not in line
        )
        for line in instructions[:deps]:
            if line.startswith("COPY"):
                words = [w for w in line.split()[1:-1] if not w.startswith("--")]
                sources = {w.strip("/").removeprefix("./") or "." for w in words}
                assert not sources & set(code), f"{name}: {line} before the dependencies"
        project = [line for line in instructions[deps:] if "pip install --no-deps" in line]
        assert any(line.rstrip().endswith(" .") for line in project), name  # then the code


def test_the_api_and_workers_bound_lora_rank_like_vllm(tmp_path: Path) -> None:
    """Jobs above vLLM's --max-lora-rank are refused by the API and the worker: same value."""
    services = _resolved(_env_file(tmp_path, VLLM_MAX_LORA_RANK="16"))["services"]
    assert _flag(services["vllm"]["command"], "--max-lora-rank") == "16"
    for name in ("api", "worker", "ops-worker", "beat"):
        assert services[name]["environment"]["VLLM_MAX_LORA_RANK"] == "16", name


def test_serving_scales_out_from_the_same_file(tmp_path: Path) -> None:
    """`--scale api=2` (a host port range) and a second vLLM server (`--profile second-vllm`),
    both resolving vLLM adapters by name from the shared store."""
    env = _env_file(
        tmp_path, API_PORTS="8000-8001", VLLM_URLS="http://vllm:8000,http://vllm-2:8000"
    )
    tool = shutil.which("docker-compose")
    assert tool
    done = subprocess.run(
        [tool, "--env-file", str(env), "-f", str(COMPOSE), "--profile", "second-vllm", "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    first, second = services["vllm"], services["vllm-2"]
    assert second["command"] == first["command"] and second["image"] == first["image"]
    for vllm in (first, second):
        assert vllm["environment"]["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/data/adapters/@by-name"
        assert _mount(vllm, "adapters") == "/data/adapters"
    devices = [s["deploy"]["resources"]["reservations"]["devices"][0] for s in (first, second)]
    assert devices[0]["device_ids"] != devices[1]["device_ids"]
    api = services["api"]
    assert api["environment"]["VLLM_URL"] == "http://vllm:8000,http://vllm-2:8000"
    assert api["environment"]["VLLM_MODEL_PATH"] in first["command"]  # what the resolver checks
    published = api["ports"][0]
    published = published if isinstance(published, str) else f"{published['published']}"
    assert "8000-8001" in published, api["ports"]
    assert "/data/adapters" in " ".join(services["prepare-model"]["command"])
    assert second["profiles"] == ["second-vllm"] and "profiles" not in first  # only when asked
