"""`ray job submit` of the smoke grid to a `ray start --head` cluster on loopback."""

import json
import os
import re
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.pipelines.test_grid import smoke_args


def test_smoke_grid_as_a_ray_job_on_a_started_cluster(tmp_path, monkeypatch):
    """`ray start --head` on loopback, `ray job submit` of the smoke grid, SUCCEEDED."""
    bin_dir = os.path.dirname(sys.executable)
    ray_cli = os.path.join(bin_dir, "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
    dashboard = "8299"
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1",
                    "--port", "6399", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                    dashboard, "--num-cpus", "2", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        job_env = json.dumps({"env_vars": {
            "RLSEDIT_CACHE": os.environ["RLSEDIT_CACHE"],
            "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "HF_HUB_OFFLINE": "1"}})
        submit = subprocess.run(
            [ray_cli, "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", job_env, "--no-wait", "--",
             sys.executable, "-m", "pipelines.grid", *smoke_args(tmp_path, "--set", "name=job-smoke",
                                                            "--set", "editors=[rlsedit]")],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert submit.returncode == 0, submit.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout + submit.stderr).group(0)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # the SDK client checks it too
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        deadline = time.time() + 600
        while time.time() < deadline:
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(3)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "| tiny-llama-rlsedit-s0 |" in logs
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
