"""The guided install, headless: what is asked of PyTorchUtils and pip, in which order, with which flags and
environment, and the sentence each failure gives. The stand-ins are strict: PyTorchUtils' logic has exactly the
signature of fepegar/SlicerPyTorch's `PyTorchUtilsLogic.installTorch`, and pip takes one argument as Slicer
5.10's `slicer.util.pip_install(requirements)` does."""

import inspect
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from MedSAM2SlicerLib import install

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MedSAM2Slicer"
BARE = {"torch": None, "sam2": None, "medsam2-slicer-backend": None, "fastapi": None, "uvicorn": None}
READY = {"torch": "2.6.0+cu124", "sam2": "1.1.0", "medsam2-slicer-backend": "0.1.0", "fastapi": "0.115",
         "uvicorn": "0.30"}


class World:
    """Installed versions, changed by the stand-ins as a real install would; records every request in order."""

    def __init__(self, versions, torch_gets="2.6.0+cu124", fail=None, torch_returns="torch module"):
        self.installed = dict(versions)
        self.torch_gets, self.fail, self.torch_returns = torch_gets, fail, torch_returns
        self.requests = []

    def versions(self):
        return dict(self.installed)

    def pip_install(self, requirements):
        args = list(requirements)
        snapshot = {"args": args, "SAM2_BUILD_CUDA": os.environ.get("SAM2_BUILD_CUDA")}
        target = args[-1]
        if target.endswith("[server]"):
            source = pathlib.Path(target[:-len("[server]")])
            snapshot["backend_files"] = sorted(str(p.relative_to(source)) for p in source.rglob("*.py"))
            snapshot["has_pyproject"] = (source / "pyproject.toml").is_file()
        self.requests.append(("pip", snapshot))
        if self.fail and self.fail in " ".join(args):
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *args])
        if target.startswith("torch"):
            self.installed["torch"] = self.torch_gets
        elif target.startswith("sam2"):
            self.installed["sam2"] = "1.1.0"
        elif target.endswith("[server]"):
            self.installed.update({"medsam2-slicer-backend": "0.1.0", "fastapi": "0.115", "uvicorn": "0.30"})

    def pytorch_utils(self):
        world = self

        class PyTorchUtilsLogic:  # the real method's signature (SlicerPyTorch, PyTorchUtils/PyTorchUtils.py)
            def installTorch(self, askConfirmation=False, forceComputationBackend=None,
                             torchVersionRequirement=None, torchvisionVersionRequirement=None):
                world.requests.append(("installTorch", {
                    "askConfirmation": askConfirmation, "forceComputationBackend": forceComputationBackend,
                    "torchVersionRequirement": torchVersionRequirement,
                    "torchvisionVersionRequirement": torchvisionVersionRequirement}))
                if isinstance(world.torch_returns, Exception):
                    raise world.torch_returns
                if world.torch_returns is not None:
                    world.installed["torch"] = world.torch_gets
                return world.torch_returns

        return types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)


def _installer(world, pytorch=True, backend_dir=None, **kwargs):
    return install.BackendInstaller(world.pip_install, world.pytorch_utils() if pytorch else None,
                                    backend_dir=backend_dir or install.shipped_backend_dir(MODULE_DIR),
                                    versions=world.versions, **kwargs)


def test_the_shipped_backend_is_found_with_its_version(tmp_path):
    backend = install.shipped_backend_dir(MODULE_DIR)  # a checkout: backend/ next to the module folder
    assert backend == ROOT / "backend"
    assert install.shipped_backend_version(backend) == "0.1.0"
    module = tmp_path / "qt-scripted-modules"  # an installed extension: the module's Resources/backend
    assert install.shipped_backend_dir(module) is None
    (module / "Resources" / "backend" / "src" / "medsam2_backend").mkdir(parents=True)
    (module / "Resources" / "backend" / "pyproject.toml").write_text((backend / "pyproject.toml").read_text(encoding="utf-8"))
    assert install.shipped_backend_dir(module) == module / "Resources" / "backend"


def test_a_bare_slicer_gets_pytorch_then_sam2_then_the_shipped_backend(monkeypatch):
    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # torch was never imported in this Slicer
    world = World(BARE)
    installer = _installer(world)
    steps = installer.plan()
    assert [s.key for s in steps] == ["torch", "sam2_dependencies", "sam2", "backend"]
    text = installer.describe(steps)
    assert "PyTorch >=2.5.1 with the PyTorch extension" in text and "Download: about" in text and "free" in text
    seen = []
    outcome = installer.run(steps, progress=lambda done, total, title: seen.append((done, total)))
    assert outcome.done == ["torch", "sam2_dependencies", "sam2", "backend"] and not outcome.cancelled
    assert not outcome.restart_required
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    kinds = [kind for kind, _ in world.requests]
    assert kinds == ["installTorch", "pip", "pip", "pip"]
    # PyTorch through the PyTorch extension, sam2's minimum, no second confirmation (ours showed the size).
    assert world.requests[0][1] == {"askConfirmation": False, "forceComputationBackend": None,
                                    "torchVersionRequirement": ">=2.5.1", "torchvisionVersionRequirement": None}
    deps, sam2, backend = (snapshot for _, snapshot in world.requests[1:])
    assert deps["args"] == ["hydra-core>=1.3", "iopath", "tqdm", "pillow>=9", "numpy>=1.24", "setuptools>=61"]
    assert sam2["args"] == ["--no-build-isolation", "--no-deps", "sam2==1.1.0"] and sam2["SAM2_BUILD_CUDA"] == "0"
    assert deps["SAM2_BUILD_CUDA"] is None and backend["SAM2_BUILD_CUDA"] is None
    assert "SAM2_BUILD_CUDA" not in os.environ  # restored
    # The backend from a temporary copy of the shipped source (pip never builds inside the extension's folder).
    assert len(backend["args"]) == 1 and not backend["args"][0].startswith(str(ROOT))
    assert backend["has_pyproject"] and "src/medsam2_backend/server/app.py" in backend["backend_files"]
    assert not pathlib.Path(backend["args"][0]).exists()  # the copy is gone afterwards
    everything = " ".join(" ".join(s["args"]) for kind, s in world.requests if kind == "pip")
    assert "torchvision" not in everything and "git+" not in everything and "http" not in everything
    assert installer.plan() == []  # ready


def test_without_the_pytorch_extension_torch_comes_from_pip_first():
    world = World(BARE)
    installer = _installer(world, pytorch=False)
    steps = installer.plan()
    assert "the PyTorch extension is not installed" in steps[0].title
    installer.run(steps)
    assert world.requests[0] == ("pip", {"args": ["torch>=2.5.1"], "SAM2_BUILD_CUDA": None})
    assert [kind for kind, _ in world.requests] == ["pip"] * 4


def test_the_flags_are_the_makefiles():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    version = re.search(r"^SAM2_VERSION := (\S+)", makefile, re.M).group(1)
    line = re.search(r"^\t(SAM2_BUILD_CUDA=0) \$\(PIP\) install -q --disable-pip-version-check (.*) sam2==", makefile,
                     re.M)
    assert install.SAM2_REQUIREMENT == f"sam2=={version}"
    assert line.group(2).split() == install.SAM2_PIP_FLAGS and install.SAM2_ENVIRONMENT == {"SAM2_BUILD_CUDA": "0"}
    requirements = (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").split()
    for dependency in ("hydra-core", "iopath", "tqdm"):  # the Makefile installs sam2's pure deps beforehand
        assert any(r.startswith(dependency) for r in requirements)
    assert all(any(d.startswith(name) for d in install.SAM2_DEPENDENCIES)
               for name in ("hydra-core", "iopath", "tqdm", "pillow", "numpy"))


def test_only_what_is_missing_or_outdated_is_planned():
    assert _installer(World(READY)).plan() == []
    assert [s.key for s in _installer(World(dict(READY, torch="2.4.1"))).plan()] == ["torch"]
    # An extension update ships a newer backend: it is installed again.
    assert [s.key for s in _installer(World(dict(READY, **{"medsam2-slicer-backend": "0.0.9"}))).plan()] == [
        "backend"]
    assert [s.key for s in _installer(World(dict(READY, uvicorn=None))).plan()] == ["backend"]


@pytest.mark.parametrize("world, pytorch, expected", [
    (World(BARE, torch_returns=None), True, "PyTorch was not installed (the PyTorch extension's install was "
                                            "declined)"),
    (World(BARE, torch_returns=RuntimeError("light-the-torch: no matching distribution\nfound")), True,
     "The PyTorch extension could not install PyTorch (found). Check the internet connection"),
    (World(BARE, torch_gets="2.4.0"), True, "PyTorch 2.4.0 is installed but MedSAM2 needs >=2.5.1: update it in "
                                            "the PyTorch Utils module and restart Slicer."),
    (World(BARE, fail="torch"), False, "Installing PyTorch failed (pip exit code 1); the Python console shows"),
    (World(BARE, fail="hydra"), True, "Installing SAM-2's dependencies failed (pip exit code 1)"),
    (World(BARE, fail="sam2=="), True, "Installing SAM-2 failed (pip exit code 1)"),
    (World(BARE, fail="[server]"), True, "Installing the MedSAM2 backend failed (pip exit code 1)"),
])
def test_every_failure_is_one_sentence_and_stops_the_install(world, pytorch, expected, monkeypatch):
    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)
    installer = _installer(world, pytorch=pytorch)
    with pytest.raises(install.InstallError) as caught:
        installer.run(installer.plan())
    assert str(caught.value).startswith(expected), str(caught.value)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    assert "SAM2_BUILD_CUDA" not in os.environ  # restored after a failed sam2 install too
    kind, last = world.requests[-1]  # nothing was asked after the failing step
    assert (world.fail in " ".join(last["args"])) if world.fail else kind in ("installTorch", "pip")
    assert world.fail or len(world.requests) == 1


def test_pip_that_cannot_start_is_a_sentence():
    def no_python_slicer(requirements):
        raise RuntimeError("PythonSlicer executable not found")

    installer = install.BackendInstaller(no_python_slicer, None, backend_dir=install.shipped_backend_dir(MODULE_DIR),
                                         versions=World(READY).versions)
    installer.versions = lambda: dict(READY, sam2=None)
    with pytest.raises(install.InstallError, match=r"^Installing SAM-2's dependencies failed: PythonSlicer "
                                                   r"executable not found\.$"):
        installer.run(installer.plan())


def test_no_shipped_backend_and_no_disk_space_are_sentences(monkeypatch, tmp_path):
    world = World(dict(READY, **{"medsam2-slicer-backend": None}))
    installer = install.BackendInstaller(world.pip_install, None, backend_dir=None, versions=world.versions)
    with pytest.raises(install.InstallError, match=r"^This MedSAM2 extension has no copy of the backend's source"):
        installer.run(installer.plan())
    installer = _installer(World(BARE), site_dir=str(tmp_path / "not" / "yet"))
    monkeypatch.setattr(install.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=500 * 2**20))
    with pytest.raises(install.InstallError, match=r"^Not enough free disk space: 500 MB free where about"):
        installer.run(installer.plan())


def test_cancel_takes_effect_between_steps():
    world = World(BARE)
    installer = _installer(world)
    outcome = installer.run(installer.plan(), cancelled=lambda: len(world.requests) >= 2)
    assert outcome.cancelled and outcome.done == ["torch", "sam2_dependencies"]
    # Start again: PyTorch stays installed; sam2's dependencies are asked again (pip keeps what it has).
    assert [s.key for s in installer.plan()] == ["sam2_dependencies", "sam2", "backend"]


def test_our_call_binds_to_the_real_installtorch_signature():
    signature = inspect.signature(World(BARE).pytorch_utils().PyTorchUtilsLogic.installTorch)
    assert list(signature.parameters) == ["self", "askConfirmation", "forceComputationBackend",
                                          "torchVersionRequirement", "torchvisionVersionRequirement"]


def test_the_shipped_backend_really_builds_from_its_copy(tmp_path):
    """The backend step with a real pip (into a target folder, no dependencies): the copy is a buildable source."""
    def real_pip(requirements):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-build-isolation", "--target", str(tmp_path / "site"), *requirements], check=True)

    installer = install.BackendInstaller(real_pip, None, backend_dir=install.shipped_backend_dir(MODULE_DIR),
                                         versions=lambda: dict(READY, **{"medsam2-slicer-backend": None}))
    installer.run(installer.plan())
    site = tmp_path / "site"
    assert (site / "medsam2_backend" / "server" / "app.py").is_file()
    assert (site / "medsam2_client" / "wire.py").is_file()
    assert not list((ROOT / "backend").glob("build"))  # nothing was built inside the shipped folder


def test_device_sentences_and_the_report():
    assert install.describe_device({"torch": "2.6.0", "cuda_build": "12.4", "cuda_available": True,
                                    "cuda_device": "NVIDIA RTX 4090"}) == (
        "Device: CUDA GPU NVIDIA RTX 4090. PyTorch 2.6.0, CUDA 12.4 build.")
    assert install.describe_device({"torch": "2.6.0", "cuda_build": None, "mps_available": True}).startswith(
        "Device: Apple GPU (MPS). PyTorch 2.6.0, CPU build")
    cpu = install.describe_device({"torch": "2.6.0", "cuda_build": None})
    assert cpu.startswith("Device: CPU. PyTorch 2.6.0, CPU build.") and "per slice" in cpu
    assert install.describe_device({"probe_error": "No module named torch"}).endswith("No module named torch")

    info = install.probe_torch()  # this Python, in a child process: the CPU torch of the test environment
    assert info["torch"] == __import__("importlib.metadata").metadata.version("torch")
    assert info["cuda_available"] is False and info["sam2"] == "1.1.0"
    report = install.installation_report("5.10.0", info, server_log_tail="INFO ready\nWARNING x")
    for expected in ("Slicer: 5.10.0", f"Python: {sys.version.split()[0]}", f"torch: {info['torch']}",
                     "CUDA available: False", "sam2: 1.1.0", "backend (medsam2-slicer-backend): 0.1.0",
                     "client protocol version: ", "free disk (Slicer's Python", "free disk (model cache",
                     "  WARNING x"):
        assert expected in report, expected
