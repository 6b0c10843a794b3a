"""The adapter store on disk: version folders, staging folders, atomic publish, cleanup.

Version N of a user is the folder `<root>/<user_id>/v<N>`; the database records it relative to the
root (`<user_id>/v<N>`), resolved against each process's root when used, so nodes may mount the
store at different paths. One attempt of a training job writes its adapter into a hidden staging
folder of the user (`.staging-<job>-a<attempt>`), which is never a version; `publish` renames it
to `v<N>` (atomic on one filesystem), so a version folder is complete before anyone can see it.

Which N is next (never one issued before) is the database's to say (app.services.adapters); this
module only places, moves and removes folders.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from foundation.files import temp_siblings

ADAPTER_CONFIG = "adapter_config.json"
STAGING_PREFIX = ".staging-"


class IncompleteAdapterError(ValueError):
    """A folder to publish holds no complete adapter (no adapter_config.json)."""


@dataclass(frozen=True)
class AdapterStore:
    """The adapter store rooted at one folder (ADAPTER_DIR)."""

    root: Path

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

    def remove_user(self, user_id: str) -> None:
        """Delete every folder of a user (versions, staging)."""
        remove(self.user_folder(user_id))


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
