"""The distribution as a user installs it (`pip install .`, not `-e`): the wheel holds every module and package-data
file of the folder mapping, and imports from a fresh venv where the checkout is not on the path."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import subprocess_env


REPO = Path(__file__).resolve().parents[1]
# DESIGN.md's layout: source folder -> package in the wheel.
FOLDERS = {
    "modeling_perceptiongpt": "perceptiongpt",
    "processing": "perceptiongpt/processing",
    "trainer": "perceptiongpt/trainer",
    "hub_cards": "perceptiongpt/hub_cards",
}
IMPORT_CHECK = """
import importlib, json, os, pkgutil
import perceptiongpt
from perceptiongpt.hub_cards import model_card
from perceptiongpt.processing import metrics
names = [m.name for m in pkgutil.walk_packages(perceptiongpt.__path__, "perceptiongpt.")]
for name in names:
    importlib.import_module(name)
card = model_card({"rec_acc@0.5": 0.5}, "org/model", "Model", "set", "training", "data")
scripts = [os.path.join(metrics.module_path(name), name + ".py") for name in metrics.METRIC_MODULES]
print(json.dumps({"file": perceptiongpt.__file__, "modules": names, "card": "org/model" in str(card),
                  "scripts": [os.path.isfile(script) for script in scripts]}))
"""


def _expected_files() -> set[str]:
    files = set()
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(f"{package}/{path.relative_to(REPO / folder).as_posix()}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")  # a copy, so that the build writes nothing into the checkout
    for name in ("setup.py", "README.md", *FOLDERS):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    for cache in source.rglob("__pycache__"):
        shutil.rmtree(cache)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = out.glob("perceptiongpt-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_holds_every_module_and_package_data_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = {name for name in archive.namelist() if not name.startswith("perceptiongpt-")}
    expected = _expected_files()
    assert {"perceptiongpt/hub_cards/model_card_template.md", "perceptiongpt/trainer/cli.py"} <= expected
    assert any(name.startswith("perceptiongpt/processing/metric_modules/") for name in expected)
    assert names == expected, {"missing": sorted(expected - names), "unexpected": sorted(names - expected)}
    assert not [name for name in names if name.split("/")[0] in ("processing", "trainer", "hub_cards")]


@pytest.mark.slow
def test_wheel_imports_from_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    # the dependencies come from this interpreter's site-packages; the package itself only from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    run = subprocess.run(
        [str(python), "-c", IMPORT_CHECK],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(venv), found["file"]
    modules = {
        f[: -len(".py")].removesuffix("/__init__").replace("/", ".") for f in _expected_files() if f.endswith(".py")
    }
    assert set(found["modules"]) == {m for m in modules if "metric_modules" not in m} - {"perceptiongpt"}
    assert found["card"] and found["scripts"] == [True] * 3
    cli = subprocess.run([str(venv / "bin" / "perceptiongpt"), "--help"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "demo" in cli.stdout, cli.stderr[-2000:]
