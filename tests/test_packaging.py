"""The package as users install it (issue 15): pyproject.toml (PEP 621), console commands that work after
`pip install .` from any directory."""

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["tfscale-train", "tfscale-launch", "tfscale-build-records", "tfscale-plan", "tfscale-benchmark"]


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_directory_is_installed(pyproject):
    packages = set(pyproject["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, REPO).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(REPO, "tfscale"))
             if "__init__.py" in files}
    assert found <= packages, f"not installed: {sorted(found - packages)}"
    assert pyproject["tool"]["setuptools"]["package-dir"] == {"tfscale.models": "models",
                                                              "tfscale.cli.scripts": "scripts"}


def test_console_commands_point_at_functions(pyproject):
    import importlib

    scripts = pyproject["project"]["scripts"]
    assert sorted(scripts) == sorted(COMMANDS)
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_horovod_extra_is_pinned_and_its_environment_script_exists(pyproject):
    # The honest extra (issue 17): the one Horovod release that builds, only in the pinned environment that
    # tools/setup_horovod_env.sh builds (TensorFlow 2.14-2.18); no other extra pulls Horovod in.
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["horovod"] == ["horovod==0.28.1"]
    assert not any("horovod" in req for name, reqs in extras.items() if name != "horovod" for req in reqs)
    with open(os.path.join(REPO, "tools", "setup_horovod_env.sh")) as f:
        script = f.read()
    assert 'TF_VERSION="${TFSCALE_HOROVOD_TF:-2.18.1}"' in script and "HVD_VERSION=0.28.1" in script
    assert "HOROVOD_WITH_GLOO=1" in script and "HOROVOD_WITHOUT_MPI=1" in script


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment with tfscale installed (not editable) from a copy of the repository's sources;
    the dependencies (TensorFlow, Keras, ...) come from this interpreter's site-packages through a .pth line, so
    nothing is downloaded."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("tfscale", "models", "scripts"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "deps-from-dev-venv.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_commands_work_from_outside_the_repository(installed, tmp_path):
    from tfscale import data as tdata

    bin_dir = installed / "bin"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(bin_dir / "python"), "-c", "import tfscale, tfscale.models; print(tfscale.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert where.startswith(str(installed)), where  # the installed copy, not the repository
    for command, args in [("tfscale-train", ["--help"]), ("tfscale-build-records", ["--help"]),
                          ("tfscale-plan", ["--help"]), ("tfscale-benchmark", ["input", "--help"]),
                          ("tfscale-launch", ["--help"])]:
        proc = subprocess.run([str(bin_dir / command), *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=300)
        assert "usage" in (proc.stdout + proc.stderr).lower(), (command, proc.stderr[-2000:])
    records = str(tmp_path / "records")
    images, labels = tdata.fashion_mnist.load_arrays(split="train")
    tdata.convert_arrays(images[:64], labels[:64], records, "train", 2, progress=False)
    tdata.convert_arrays(images[64:96], labels[64:96], records, "validation", 2, progress=False)
    proc = subprocess.run([str(bin_dir / "tfscale-train"), "--dataset=imagenet", f"--data_dir={records}",
                           "--model_dir=run", "--epochs=1", "--steps_per_epoch=2", "--model=resnet8",
                           "--image_size=28", "--num_replicas=2", "--global_batch_size=16", "--num_classes=10",
                           "--all_reduce=reduction_to_one_device"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "run" / "results.json") as f:  # relative to the current directory
        assert json.load(f)["epochs_run"] == [0]
    assert "cuInit" not in proc.stderr  # quiet by default
