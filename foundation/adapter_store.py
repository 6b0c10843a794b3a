"""The adapter store on disk: version folders, staging folders, atomic publish, cleanup.

Version N of a user is the folder `<root>/<user_id>/v<N>`; the database records it relative to the
root (`<user_id>/v<N>`), resolved against each process's root when used, so nodes may mount the
store at different paths. One attempt of a training job writes its adapter into a hidden staging
folder of the user (`.staging-<job>-a<attempt>`), which is never a version; `publish` renames it
to `v<N>` (atomic on one filesystem), so a version folder is complete before anyone can see it.

Which N is next (never one issued before) is the database's to say (app.services.adapters); this
module only places, moves and removes folders.

Each recorded version is also reachable by its immutable serving name: `<root>/@by-name/<name>/`
holds relative links to the version's files and a copy of its adapter_config.json whose
`base_model_name_or_path` is the model vLLM serves (its `--model`, which vLLM's filesystem LoRA
resolver requires the adapter to name). That folder is what the resolver reads
(VLLM_LORA_RESOLVER_CACHE_DIR), so any vLLM server that mounts the store can serve any version by
name with no prior load call; the version folder itself stays as trained. `@` cannot occur in a
user id, so the folder is no user's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from foundation.files import atomic_folder, temp_siblings

ADAPTER_CONFIG = "adapter_config.json"
STAGING_PREFIX = ".staging-"
NAMES_FOLDER = "@by-name"


class IncompleteAdapterError(ValueError):
    """A folder to publish holds no complete adapter (no adapter_config.json)."""


@dataclass(frozen=True)
class AdapterStore:
    """The adapter store rooted at one folder (ADAPTER_DIR).

    `resolver_base` is the model the vLLM servers serve, as their `--model` names it; None keeps
    each adapter's own base_model_name_or_path in its name folder.
    """

    root: Path
    resolver_base: str | None = None

    def user_folder(self, user_id: str) -> Path:
        """The folder holding every version and staging folder of a user."""
        return self.root / user_id

    def version_folder(self, user_id: str, version: int) -> Path:
        """Where version N of a user's adapter lives: `<root>/<user_id>/v<N>`."""
        return self.user_folder(user_id) / f"v{version}"

    def staging_folder(self, user_id: str, job_id: str, attempt: int) -> Path:
        """Where one attempt of a job writes its adapter before publishing (hidden: no version)."""
        return self.user_folder(user_id) / f"{STAGING_PREFIX}{job_id}-a{attempt}"

    def locate(self, stored: str, user_id: str, version: int) -> Path:
        """A recorded version's folder on this node, absolute (vLLM resolves it in its own cwd).

        Rows written before paths were stored relative hold the writer's absolute folder: that
        one while it is complete, else the same version's folder under this node's root.
        """
        path = Path(stored)
        if not path.is_absolute():
            return self.root.resolve() / path
        if is_complete(path):
            return path
        return AdapterStore(self.root.resolve()).version_folder(user_id, version)

    def publish(self, staging: Path, user_id: str, version: int) -> Path:
        """Rename a complete staging folder to version N; returns the version's folder.

        A `v<N>` already there was never recorded (a run crashed between its rename and its
        commit, and N is issued again): it is replaced.
        """
        if not is_complete(staging):
            raise IncompleteAdapterError(f"{staging} holds no complete adapter ({ADAPTER_CONFIG})")
        final = self.version_folder(user_id, version)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        return final

    def remove_staging(self, staging: Path) -> None:
        """Delete a staging folder and the writer's temp folders beside it (a crash leaves them)."""
        for path in [staging, *temp_siblings(staging)]:
            remove(path)

    def remove_user(self, user_id: str, names: Iterable[str] = ()) -> None:
        """Delete every folder of a user (versions, staging) and the links of its `names`."""
        remove(self.user_folder(user_id))
        for name in names:
            unlink_name(self.root, name)

    @property
    def names_folder(self) -> Path:
        """Where versions are linked by serving name (vLLM's resolver folder)."""
        return self.root / NAMES_FOLDER


def link_name(version_folder: Path, name: str, resolver_base: str | None = None) -> Path:
    """Make `<root>/@by-name/<name>/` for a version folder `<root>/<user>/v<N>` (see module doc).

    Written whole (atomic_folder); one already there is left as it is (names are immutable).
    """
    root = version_folder.parent.parent
    final = root / NAMES_FOLDER / name
    if final.exists():
        return final
    relative = Path("..") / ".." / version_folder.parent.name / version_folder.name
    config = json.loads((version_folder / ADAPTER_CONFIG).read_text())
    if resolver_base is not None:
        config["base_model_name_or_path"] = resolver_base
    with atomic_folder(final) as tmp:
        for entry in sorted(version_folder.iterdir()):
            if entry.name != ADAPTER_CONFIG:
                (tmp / entry.name).symlink_to(relative / entry.name)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return final


def unlink_name(root: Path, name: str) -> None:
    """Remove a version's name folder (one already gone is fine)."""
    remove(root / NAMES_FOLDER / name)


def relative_path(user_id: str, version: int) -> str:
    """How the database records a version's folder: relative to the root, `<user_id>/v<N>`."""
    return str(PurePosixPath(user_id, f"v{version}"))


def is_version_folder(folder: Path, user_id: str, version: int) -> bool:
    """True when `folder` ends in `<user_id>/v<N>`, the place of version N in some store."""
    return folder.parts[-2:] == PurePosixPath(relative_path(user_id, version)).parts


def is_complete(folder: Path) -> bool:
    """True when the folder holds an adapter's config (folders are written whole: atomic_folder)."""
    return (folder / ADAPTER_CONFIG).is_file()


def remove(folder: Path) -> None:
    """Delete a folder of the store; one already gone is fine."""
    shutil.rmtree(folder, ignore_errors=True)
