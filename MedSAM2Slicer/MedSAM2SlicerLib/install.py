"""The guided install of the local backend into Slicer's own Python, and the installation report (no Qt).

What is installed, in order (each a step the panel shows with its own progress and its own failure sentence):
1. PyTorch >= 2.5.1 (sam2's minimum) through the Slicer *PyTorch* extension's
   `PyTorchUtils.PyTorchUtilsLogic().installTorch(...)`, which picks the build matching the NVIDIA driver (CPU or
   MPS elsewhere) and installs the matching torchvision with it; without that extension, `pip_install("torch>=2.5.1")`.
2. sam2's pure-Python dependencies (hydra-core, iopath, tqdm, pillow, numpy) and the setuptools its build needs.
3. `sam2==1.1.0` as the Makefile installs it: `--no-build-isolation --no-deps` (its sdist lists torchvision and a
   build-time torch, which would pull a second torch) with `SAM2_BUILD_CUDA=0` (the optional CUDA extension only
   fills holes, which the engine turns off, and compiling it needs a CUDA toolkit users do not have).
4. The backend (`medsam2-slicer-backend[server]`) from the copy of its source that ships inside the extension
   (`Resources/backend`, see the module's CMakeLists), copied to a temporary folder first so pip never writes
   into the extension's install folder. No git, no checkout, no network path of ours; pip fetches the backend's
   dependencies (scipy, fastapi, uvicorn, slicerio, ...) from PyPI.

`pip_install` and the PyTorchUtils module are passed in: the panel passes `slicer.util.pip_install` and the
imported `PyTorchUtils` (or None), the tests pass stand-ins. User-visible sentences go through `tr`, a no-op here
that the Qt layer replaces with `slicer.i18n.tr`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from typing import Callable

TORCH_REQUIREMENT = ">=2.5.1"
SAM2_REQUIREMENT = "sam2==1.1.0"
SAM2_DEPENDENCIES = ["hydra-core>=1.3", "iopath", "tqdm", "pillow>=9", "numpy>=1.24", "setuptools>=61"]
SAM2_PIP_FLAGS = ["--no-build-isolation", "--no-deps"]
SAM2_ENVIRONMENT = {"SAM2_BUILD_CUDA": "0"}
BACKEND_DISTRIBUTION = "medsam2-slicer-backend"

# Approximate download and installed sizes in MB (PyPI / download.pytorch.org wheels, 2026); shown before asking.
SIZES_MB = {"torch_cuda": (2600, 6000), "torch_cpu": (200, 800), "torch_macos": (80, 300),
            "sam2_dependencies": (10, 40), "sam2": (1, 5), "backend": (50, 200)}
CPU_SPEED_NOTE = ("On a CPU MedSAM2 takes about 0.5-1 s per slice (measured 0.46-0.92 s on a 2-core machine): "
                  "a 100-slice propagation takes one to two minutes. A CUDA GPU is many times faster.")


def tr(text: str) -> str:
    """Translation hook: the identity here; the Qt layer rebinds `install.tr` to `slicer.i18n.tr`."""
    return text


class InstallError(Exception):
    """One step of the install failed; the message is the sentence to show."""


@dataclass
class InstallStep:
    key: str  # torch, sam2_dependencies, sam2, backend
    title: str
    download_mb: int
    disk_mb: int


@dataclass
class InstallOutcome:
    done: list[str] = field(default_factory=list)
    cancelled: bool = False
    restart_required: bool = False  # an older torch was already imported in this process


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'2.5.1+cu121' -> (2, 5, 1); None or unparsable -> ()."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version or "")
    return tuple(int(part) for part in match.groups() if part is not None) if match else ()


def installed_versions() -> dict[str, str | None]:
    """Installed distributions' versions from their metadata (nothing is imported, so torch is not loaded)."""
    versions = {}
    for name in ("torch", "sam2", BACKEND_DISTRIBUTION, "fastapi", "uvicorn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def shipped_backend_dir(module_dir) -> pathlib.Path | None:
    """The backend's source: `Resources/backend` of an installed extension, else `backend/` of a checkout."""
    module_dir = pathlib.Path(module_dir)
    for candidate in (module_dir / "Resources" / "backend", module_dir.parent / "backend"):
        if (candidate / "pyproject.toml").is_file() and (candidate / "src" / "medsam2_backend").is_dir():
            return candidate
    return None


def shipped_backend_version(backend_dir: pathlib.Path) -> str:
    import tomllib

    return tomllib.loads((backend_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def _torch_sizes(pytorch_utils) -> tuple[int, int]:
    """The torch build that will come: with an NVIDIA driver the CUDA one; PyPI's Linux torch is always the CUDA
    build; light-the-torch (the PyTorch extension) and PyPI on Windows give the CPU one otherwise."""
    if sys.platform == "darwin":
        return SIZES_MB["torch_macos"]
    if shutil.which("nvidia-smi") is not None or (sys.platform.startswith("linux") and pytorch_utils is None):
        return SIZES_MB["torch_cuda"]
    return SIZES_MB["torch_cpu"]


class BackendInstaller:
    def __init__(self, pip_install: Callable, pytorch_utils=None, backend_dir=None,
                 versions: Callable[[], dict] = installed_versions, environ=os.environ,
                 site_dir: str | None = None):
        self.pip_install, self.pytorch_utils = pip_install, pytorch_utils
        self.backend_dir = None if backend_dir is None else pathlib.Path(backend_dir)
        self.versions, self.environ = versions, environ
        self.site_dir = site_dir or sysconfig.get_paths()["purelib"]

    # ---- what is missing ------------------------------------------------------------------------------------
    def plan(self) -> list[InstallStep]:
        """The steps still needed, in order; empty when the backend is ready to start."""
        have = self.versions()
        steps = []
        if version_tuple(have["torch"]) < version_tuple(TORCH_REQUIREMENT[2:]):
            how = (tr("with the PyTorch extension (the build for this computer's GPU, or CPU)")
                   if self.pytorch_utils is not None else
                   tr("from PyPI (the PyTorch extension is not installed: install it from the Extensions Manager "
                      "to get the build matched to your GPU driver)"))
            steps.append(InstallStep("torch", tr("PyTorch {requirement} {how}").format(
                requirement=TORCH_REQUIREMENT, how=how), *_torch_sizes(self.pytorch_utils)))
        if have["sam2"] is None:
            steps.append(InstallStep("sam2_dependencies", tr("SAM-2's dependencies (hydra-core, iopath, tqdm)"),
                                     *SIZES_MB["sam2_dependencies"]))
            steps.append(InstallStep("sam2", tr("SAM-2 (sam2 1.1.0, without its optional CUDA build)"),
                                     *SIZES_MB["sam2"]))
        shipped = shipped_backend_version(self.backend_dir) if self.backend_dir is not None else None
        if have[BACKEND_DISTRIBUTION] is None or have["fastapi"] is None or have["uvicorn"] is None or (
                shipped is not None and have[BACKEND_DISTRIBUTION] != shipped):
            steps.append(InstallStep("backend", tr("the MedSAM2 backend {version} (shipped with this extension) "
                                                   "and its server").format(version=shipped or ""),
                                     *SIZES_MB["backend"]))
        return steps

    def describe(self, steps: list[InstallStep]) -> str:
        """The confirmation text: what will be installed, the download size and the disk space it needs."""
        download = sum(step.download_mb for step in steps)
        disk = sum(step.disk_mb for step in steps)
        lines = [tr("MedSAM2 needs these in Slicer's Python to run on this computer:")]
        lines += [f"  {n}. {step.title}" for n, step in enumerate(steps, 1)]
        lines.append(tr("Download: about {download}; disk space: about {disk} ({free} free). "
                        "It can take several minutes; you can cancel between steps.").format(
            download=_size(download), disk=_size(disk), free=_size(self.free_disk_mb())))
        return "\n".join(lines)

    def free_disk_mb(self) -> int:
        path = pathlib.Path(self.site_dir)
        while not path.exists():
            path = path.parent
        return shutil.disk_usage(path).free // 2**20

    # ---- doing it ---------------------------------------------------------------------------------------------
    def run(self, steps: list[InstallStep], progress: Callable[[int, int, str], None] | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> InstallOutcome:
        """Run the steps in order. `progress(done, total, title)` before each; `cancelled()` is asked between
        steps (pip cannot be interrupted midway; what is installed stays installed). Raises InstallError."""
        needed = sum(step.disk_mb for step in steps)
        free = self.free_disk_mb()
        if free < needed:
            raise InstallError(tr("Not enough free disk space: {free} free where about {needed} are needed for "
                                  "Slicer's Python ({path}). Free some space and try again.").format(
                free=_size(free), needed=_size(needed), path=self.site_dir))
        outcome = InstallOutcome()
        for n, step in enumerate(steps):
            if cancelled():
                outcome.cancelled = True
                return outcome
            if progress is not None:
                progress(n, len(steps), step.title)
            getattr(self, f"_install_{step.key}")(outcome)
            outcome.done.append(step.key)
        importlib.invalidate_caches()
        if progress is not None:
            progress(len(steps), len(steps), tr("Done."))
        return outcome

    def _install_torch(self, outcome: InstallOutcome) -> None:
        outcome.restart_required = "torch" in sys.modules  # an imported torch is not replaced until a restart
        if self.pytorch_utils is not None:
            try:
                # Our dialog already asked (with the size), so the PyTorch extension is not asked to ask again.
                torch = self.pytorch_utils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            except Exception as error:  # light-the-torch / pip errors arrive as any type: say which step failed
                raise InstallError(tr("The PyTorch extension could not install PyTorch ({error}). Check the "
                                      "internet connection (or proxy), or install PyTorch in the PyTorch Utils "
                                      "module, then try again.").format(error=_one_line(error))) from error
            if torch is None:
                raise InstallError(tr("PyTorch was not installed (the PyTorch extension's install was declined). "
                                      "MedSAM2 cannot run on this computer without it."))
        else:
            self._pip(["torch" + TORCH_REQUIREMENT], tr("PyTorch"))
        importlib.invalidate_caches()
        version = self.versions()["torch"]
        if version_tuple(version) < version_tuple(TORCH_REQUIREMENT[2:]):
            raise InstallError(tr("PyTorch {version} is installed but MedSAM2 needs {requirement}: update it in "
                                  "the PyTorch Utils module and restart Slicer.").format(
                version=version or tr("(none)"), requirement=TORCH_REQUIREMENT))

    def _install_sam2_dependencies(self, outcome: InstallOutcome) -> None:
        self._pip(list(SAM2_DEPENDENCIES), tr("SAM-2's dependencies"))

    def _install_sam2(self, outcome: InstallOutcome) -> None:
        # slicer.util.pip_install runs pip in a child process that inherits this process's environment.
        with _environment(self.environ, SAM2_ENVIRONMENT):
            self._pip([*SAM2_PIP_FLAGS, SAM2_REQUIREMENT], tr("SAM-2"))

    def _install_backend(self, outcome: InstallOutcome) -> None:
        if self.backend_dir is None:
            raise InstallError(tr("This MedSAM2 extension has no copy of the backend's source (Resources/backend "
                                  "is missing): reinstall the extension, or connect to a remote server."))
        with tempfile.TemporaryDirectory(prefix="medsam2-backend-") as workdir:
            source = pathlib.Path(workdir) / "backend"
            shutil.copytree(self.backend_dir, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
            self._pip([f"{source}[server]"], tr("the MedSAM2 backend"))

    def _pip(self, args: list[str], what: str) -> None:
        try:
            self.pip_install(args)
        except subprocess.CalledProcessError as error:
            raise InstallError(tr("Installing {what} failed (pip exit code {code}); the Python console shows "
                                  "pip's output. Check the internet connection (or proxy) and the free disk space, "
                                  "then try again.").format(what=what, code=error.returncode)) from error
        except (OSError, RuntimeError) as error:  # e.g. Slicer's "PythonSlicer executable not found"
            raise InstallError(tr("Installing {what} failed: {error}.").format(
                what=what, error=_one_line(error))) from error


@contextlib.contextmanager
def _environment(environ, values: dict):
    saved = {key: environ.get(key) for key in values}
    environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value


def _size(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


# ---- after installing: the device, and a report to paste into a bug report ------------------------------------
_PROBE = r"""
import json, importlib.metadata as md
info = {}
for name in ("torch", "sam2", "medsam2-slicer-backend"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
try:
    import torch
    info["cuda_build"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    info["cuda_device"] = torch.cuda.get_device_name(0) if info["cuda_available"] else None
    info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(info))
"""


def probe_torch(python: str | None = None, timeout: float = 180.0) -> dict:
    """torch, CUDA and package versions as the server's Python sees them, from a child process (torch is never
    loaded into Slicer's process, and a broken CUDA setup cannot take Slicer down)."""
    try:
        done = subprocess.run([python or sys.executable, "-c", _PROBE], capture_output=True, encoding="utf-8", errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"probe_error": _one_line(error)}
    if done.returncode != 0:
        return {"probe_error": _one_line(RuntimeError(done.stderr or f"exit code {done.returncode}"))}
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe_device(info: dict) -> str:
    """One or two sentences: the device the local server will use and the torch build."""
    if info.get("probe_error") or info.get("torch_error") or not info.get("torch"):
        return tr("PyTorch does not load in this Python: {error}").format(
            error=info.get("probe_error") or info.get("torch_error") or tr("it is not installed"))
    build = tr("PyTorch {version}, CUDA {cuda} build").format(version=info["torch"], cuda=info["cuda_build"]) \
        if info.get("cuda_build") else tr("PyTorch {version}, CPU build").format(version=info["torch"])
    if info.get("cuda_available"):
        return tr("Device: CUDA GPU {name}. {build}.").format(name=info["cuda_device"], build=build)
    if info.get("mps_available"):
        return tr("Device: Apple GPU (MPS). {build}.").format(build=build)
    note = tr(" The computer has an NVIDIA driver but this PyTorch cannot use it: reinstall PyTorch in the "
              "PyTorch Utils module.") if info.get("cuda_build") is None and shutil.which("nvidia-smi") else ""
    return tr("Device: CPU. {build}. {speed}").format(build=build, speed=tr(CPU_SPEED_NOTE)) + note


def installation_report(slicer_version: str, info: dict, server_log_tail: str = "",
                        disk_paths: dict | None = None) -> str:
    """The paste-able text the Check button prints (plain text, no personal data beyond paths)."""
    from medsam2_client import PROTOCOL_VERSION

    disk_paths = disk_paths or {"Slicer's Python": sysconfig.get_paths()["purelib"],
                                "model cache": os.environ.get("MEDSAM2_CACHE",
                                                              str(pathlib.Path.home() / ".cache" / "medsam2-slicer"))}
    lines = ["MedSAM2Slicer installation report",
             f"Slicer: {slicer_version}",
             f"Python: {sys.version.split()[0]} ({sys.executable})",
             f"OS: {platform.platform()}",
             f"torch: {info.get('torch') or 'not installed'}",
             f"CUDA build: {info.get('cuda_build') or 'none (CPU build)'}",
             f"CUDA available: {info.get('cuda_available')}" + (f" ({info['cuda_device']})"
                                                                 if info.get("cuda_device") else ""),
             f"MPS available: {info.get('mps_available')}",
             f"sam2: {info.get('sam2') or 'not installed'}",
             f"backend (medsam2-slicer-backend): {info.get('medsam2-slicer-backend') or 'not installed'}",
             f"client protocol version: {PROTOCOL_VERSION}"]
    if info.get("probe_error") or info.get("torch_error"):
        lines.append(f"torch error: {info.get('probe_error') or info.get('torch_error')}")
    for name, path in disk_paths.items():
        probe = pathlib.Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        lines.append(f"free disk ({name}, {path}): {_size(shutil.disk_usage(probe).free // 2**20)}")
    lines.append("server log (last lines):")
    lines += [f"  {line}" for line in (server_log_tail.splitlines() or ["(no local server log)"])]
    return "\n".join(lines)
