"""What Slicer's Extensions Index checks, kept true offline (nothing can be fetched at test time).

The rules are copied from Slicer/ExtensionsIndex `scripts/check_description_files.py` (2026-08) and the catalog
entry schema `Slicer/Slicer` `Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json`.
"""

import json
import pathlib
import re
import subprocess
import sys
import tomllib
import urllib.parse

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HOMEPAGE = "https://github.com/MedSAM2Slicer/MedSAM2Slicer"

# Schema v1.0.1: required keys, every allowed key with its JSON type, and the enums (additionalProperties: false).
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
SCHEMA_ENUMS = {"scm_type": {"git", "local"}, "tier": {1, 3, 5}}
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.1.json#")
# check_description_files.py: ACCEPTED_EXTENSION_CATEGORIES, LICENSE names, scm_url schemes, repository size limit.
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools"}
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
SIZE_LIMIT_MB = 100


def _cmake_value(key: str) -> str:
    match = re.search(rf'set\s*\(EXTENSION_{key}\s*"([^"]+)"[ ]*\)', (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert match, f"EXTENSION_{key} is not set in the top-level CMakeLists.txt"
    return match.group(1)


def _repository_file(url: str) -> pathlib.Path:
    """The file a raw.githubusercontent.com URL of this repository's catalog revision names."""
    entry = json.loads((ROOT / "MedSAM2Slicer.json").read_text(encoding="utf-8"))
    owner_repo = urllib.parse.urlsplit(HOMEPAGE).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{entry['scm_revision']}/"
    assert url.startswith(prefix), f"{url} is not a file of {owner_repo} at {entry['scm_revision']}"
    return ROOT / url[len(prefix):]


def test_catalog_entry_matches_schema_v1_0_1_and_the_index_rules():
    path = ROOT / "MedSAM2Slicer.json"
    assert b"\r" not in path.read_bytes()  # the index refuses CR/CRLF line endings
    entry = json.loads(path.read_text(encoding="utf-8"))
    assert entry["$schema"] == SCHEMA_URL
    assert SCHEMA_REQUIRED <= set(entry) <= set(SCHEMA_TYPES), set(entry) - set(SCHEMA_TYPES)
    for key, value in entry.items():
        assert type(value) is SCHEMA_TYPES[key], (key, value)  # bool is not int: `type`, not isinstance
        assert key not in SCHEMA_ENUMS or value in SCHEMA_ENUMS[key], (key, value)
    assert all(isinstance(item, str) for item in entry["build_dependencies"])
    assert entry["category"] in ACCEPTED_CATEGORIES
    assert urllib.parse.urlsplit(entry["scm_url"]).scheme in {"git", "https"}
    # `project()` in the top CMakeLists equals the catalog file's name; the extension name may not start "Slicer".
    project = re.search(r"project\s*\(\s*([^\s)]+)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"), re.I).group(1)
    assert project == path.stem and not project.lower().startswith("slicer")
    assert _cmake_value("CATEGORY") == entry["category"]


def test_pytorch_is_declared_as_dependency_in_cmake_and_catalog():
    entry = json.loads((ROOT / "MedSAM2Slicer.json").read_text(encoding="utf-8"))
    assert _cmake_value("DEPENDS").split() == entry["build_dependencies"] == ["PyTorch"]


def test_one_homepage_everywhere():
    entry = json.loads((ROOT / "MedSAM2Slicer.json").read_text(encoding="utf-8"))
    assert _cmake_value("HOMEPAGE") == HOMEPAGE and _cmake_value("HOMEPAGE").startswith("https://")
    assert entry["scm_url"].removesuffix(".git") == HOMEPAGE
    pyproject = tomllib.loads((ROOT / "backend" / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["urls"]["Homepage"] == HOMEPAGE
    owner_repo = urllib.parse.urlsplit(HOMEPAGE).path.strip("/")
    # Any mention of this project's GitHub repository, in any tracked text file, names the same one.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", check=True).stdout
    mentions = set()
    for name in tracked.split():
        file = ROOT / name
        if file.suffix in {".png", ".jpg"} or not file.is_file():
            continue
        text = file.read_text(errors="replace")
        mentions |= set(re.findall(r"github(?:usercontent)?\.com/([\w.-]+/MedSAM2Slicer)\b", text, re.I))
    assert mentions == {owner_repo}, mentions


def test_license_at_the_root_says_apache_and_that_weights_are_not_shipped():
    found = [name for name in LICENSE_NAMES if (ROOT / name).is_file()]
    assert found == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "CC-BY-SA-4.0" in text and "never" in text and "shipped" in text
    pyproject = tomllib.loads((ROOT / "backend" / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert not [p for p in ROOT.rglob("*.pt") if ".venv" not in p.parts]  # no weights in the tree


def test_icon_and_screenshots_exist_in_top_level_resources_and_decode():
    from PIL import Image

    icon = _repository_file(_cmake_value("ICONURL"))
    assert icon.parent == ROOT / "Resources" / "Icons"
    with Image.open(icon) as image:
        image.verify()
    with Image.open(icon) as image:
        assert image.format == "PNG" and image.size == (128, 128)  # the Extensions Manager's icon size
    screenshots = [_repository_file(url) for url in _cmake_value("SCREENSHOTURLS").split()]
    assert screenshots
    for path in screenshots:
        assert path.parent == ROOT / "Resources" / "Screenshots"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 400


def test_the_backend_source_ships_inside_the_extension_where_the_installer_looks():
    """CMake copies backend/pyproject.toml and every .py of backend/src to the module's Resources/backend (build
    tree and install tree); `install.shipped_backend_dir` looks there first."""
    from MedSAM2SlicerLib import install

    cmake = (ROOT / "MedSAM2Slicer" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "set(MEDSAM2_BACKEND_RESOURCE_DIR Resources/backend)" in cmake
    for source in ("backend/pyproject.toml", "backend/src"):
        assert re.search(rf"file\(COPY \$\{{PROJECT_SOURCE_DIR\}}/{source} DESTINATION "
                         r"\$\{_backend_build_dir\}", cmake)
        assert re.search(rf"install\((?:FILES|DIRECTORY) \$\{{PROJECT_SOURCE_DIR\}}/{source}\s+DESTINATION "
                         r"\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/\$\{MEDSAM2_BACKEND_RESOURCE_DIR\}", cmake)
    assert cmake.count('FILES_MATCHING PATTERN "*.py"') == 2
    # Everything the backend needs at run time is a .py file (the copy takes nothing else from src/).
    others = [p for p in (ROOT / "backend" / "src").rglob("*") if p.is_file() and p.suffix != ".py"
              and "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)]
    assert others == []
    module = ROOT / "MedSAM2Slicer"
    assert install.shipped_backend_dir(module) == ROOT / "backend"  # a checkout; installed: Resources/backend


def test_cmake_range_is_slicer_5_10s():
    assert re.match(r"cmake_minimum_required\(VERSION 3\.20\.6\.\.\.3\.22\.6 FATAL_ERROR\)",
                    (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))


def test_repository_is_under_the_size_limit():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", check=True)
    size = sum((ROOT / name).stat().st_size for name in tracked.stdout.split("\0") if (ROOT / name).is_file())
    assert size < SIZE_LIMIT_MB * 2**20


def test_screenshot_script_renders_a_labelled_result(tmp_path, monkeypatch):
    """The committed script, run: four panels; the segment shows in every one; the title says which engine."""
    import slicer
    from PIL import Image

    monkeypatch.setattr(slicer, "mrmlScene", None, raising=False)  # the script sets its own headless scene
    monkeypatch.setattr(slicer, "modules", None, raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "Utilities"))
    sys.modules.pop("render_screenshot", None)
    import render_screenshot

    assert "DETERMINISTIC TEST ENGINE" in render_screenshot.TITLE
    out = render_screenshot.render(tmp_path / "shot.png")
    size = render_screenshot.PANEL_PX
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape == (2 * size + 30, 2 * size, 3)
    colour = np.array(render_screenshot.SEGMENT_RGB) * 255
    for n in range(4):
        row, col = divmod(n, 2)
        panel = pixels[30 + row * size:30 + (row + 1) * size, col * size:(col + 1) * size]
        # Slices: the outline in the segment's colour; 3D: shaded surface pixels close to its hue (orange).
        exact = (np.abs(panel - colour) <= 1).all(axis=-1).sum()
        orange = ((panel[..., 0] > 1.3 * panel[..., 2] + 40) & (panel[..., 1] > panel[..., 2])).sum()
        assert (exact if n != 1 else orange) > 200, n
    from MedSAM2SlicerLib import demo

    assert (pixels[:30] == np.array(demo.LABEL_RGB)).all(axis=-1).sum() > 100  # the title is written


@pytest.mark.parametrize("key", ["ICONURL", "SCREENSHOTURLS"])
def test_image_urls_are_https(key):
    assert all(url.startswith("https://") for url in _cmake_value(key).split())
