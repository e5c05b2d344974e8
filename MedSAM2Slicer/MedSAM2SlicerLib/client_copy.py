"""The extension uses its own copy of `medsam2_client`, never another one that happens to come first.

Slicer appends scripted modules' folders to `sys.path` after site-packages, so a pip-installed backend's
`medsam2_client` would shadow the extension's copy (version skew). And in a source checkout (Developer mode: add
module path) the copy lives in `backend/src`, on no path at all: without this the effect's import fails at load and
it silently never registers. Where the copy is: next to this module's package when installed (CMakeLists.txt
installs it into the scripted-modules lib dir with the module), or `../backend/src` in the source tree.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys

PACKAGE = "medsam2_client"
MODULE_DIR = pathlib.Path(__file__).resolve().parents[1]  # the folder holding MedSAM2Slicer.py
CANDIDATES = (MODULE_DIR, MODULE_DIR.parent / "backend" / "src")  # installed, source checkout


class ClientCopyError(ImportError):
    """Another, different `medsam2_client` is already loaded; the message says what to do."""


def own_copy() -> pathlib.Path | None:
    """The folder holding the extension's own `medsam2_client` package."""
    for folder in CANDIDATES:
        if (folder / PACKAGE / "__init__.py").is_file():
            return folder
    return None


def _digest(package_dir: pathlib.Path) -> str:
    """The package's Python sources (names and contents): equal digests are the same version."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def use_own_client() -> None:
    """Put the own copy first on `sys.path`; refuse (a sentence) when a different copy is already imported."""
    folder = own_copy()
    if folder is None:
        return  # neither layout: whatever `import medsam2_client` finds (a plain pip install of the backend)
    loaded = sys.modules.get(PACKAGE)
    if loaded is not None and getattr(loaded, "__file__", None):
        loaded_dir = pathlib.Path(loaded.__file__).resolve().parent
        if loaded_dir != folder / PACKAGE and _digest(loaded_dir) != _digest(folder / PACKAGE):
            from .local_backend import BACKEND_REQUIREMENT

            raise ClientCopyError(
                f"Another version of {PACKAGE} (at {loaded_dir}) is already loaded in Slicer's Python, not the one "
                f"this MedSAM2 extension ships; reinstall the backend of this release with "
                f"slicer.util.pip_install('{BACKEND_REQUIREMENT}') (or remove the other copy), then restart Slicer.")
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))
