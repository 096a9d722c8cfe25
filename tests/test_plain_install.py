"""A real plain install (no extras) in a fresh virtual environment: every subcommand ends in success or one line
naming the extra it needs, never a traceback. Slow: it installs opendaam and its core dependencies."""

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_plain_install_in_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=1200)  # the CPU wheel first, as the README says
    subprocess.run([*pip, str(ROOT)], check=True, timeout=1200)  # no extras
    missing = subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True)
    assert missing.returncode != 0, "matplotlib is installed without the eval extra: the test would prove nothing"
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: toy-urban\nclasses:\n  - name: car\n    prompts: ['a {} in an urban environment']\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    runs = [
        (["--help"], 0, ""),
        (["generate", "a car in an urban environment", "--steps", "2", "--out", str(tmp_path / "g")], 0, ""),
        (["report", str(tmp_path / "g")], 0, ""),
        (["demo", "--out", str(tmp_path / "demo")], 0, ""),
        (["evaluate", "--records", str(tmp_path), "--masks", str(tmp_path), "--out", str(tmp_path / "e")], 1,
         "pip install 'opendaam[eval]'"),
        (["experiment", "thesis", "--out", str(tmp_path / "x")], 1, "pip install 'opendaam[eval]'"),
        (["dataset", "check", str(spec)], 1, "pip install 'opendaam[dataset]'"),
        (["dataset", "generate", str(spec), "--out", str(tmp_path / "d")], 1, "pip install 'opendaam[dataset]'"),
        (["dataset", "init", str(tmp_path / "init.yaml")], 0, ""),
    ]
    script = env_dir / "bin" / "opendaam"
    for argv, code, message in runs:
        done = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env, timeout=600)
        print(argv[0], done.returncode, done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else "")
        assert "Traceback" not in done.stderr, (argv, done.stderr)
        assert done.returncode == code, (argv, done.returncode, done.stderr)
        assert message in done.stderr, (argv, done.stderr)
    assert (tmp_path / "g" / "index.html").exists() and not (tmp_path / "d").exists()
