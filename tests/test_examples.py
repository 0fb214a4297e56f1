"""The scripts in examples/ run as a researcher would run them, and do what they say: a model that is not the
library's trains with SGDrop and RSC in the user's own step, and the loss falls."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script, devices", [("own_linen_model.py", 1), ("own_nnx_model.py", 1),
                                             ("sharded_own_step.py", 8)])
def test_the_example_trains_and_the_loss_falls(script, devices):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if devices > 1:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  done = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "40"], capture_output=True, text=True,
                        env=env, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  lines = [line for line in done.stdout.splitlines() if line.startswith(("sgdrop", "rsc"))]
  assert len(lines) == 2 and all("(fell)" in line for line in lines), done.stdout
  if devices > 1:
    assert all(f"on {devices} devices" in line for line in lines), done.stdout
