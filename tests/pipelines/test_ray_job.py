"""`ray job submit` of the smoke grid to a `ray start --head` cluster on loopback, on ports
of its own so that it runs beside another local Ray.

The cluster runs under `ray start --block` in its own process group and is stopped by
signalling that group, never by `ray stop`, which would stop every Ray on the machine.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from tests.conftest import ROOT
from tests.pipelines.test_grid import smoke_args


def test_smoke_grid_as_a_ray_job_on_a_started_cluster(tmp_path, monkeypatch):
    """`ray start --head` on loopback, `ray job submit` of the smoke grid, SUCCEEDED."""
    bin_dir = os.path.dirname(sys.executable)
    ray_cli = os.path.join(bin_dir, "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DISABLE_USAGE_STATS": "1"}
    dashboard = "8299"
    address = f"http://127.0.0.1:{dashboard}"
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", "6399", "--dashboard-host", "127.0.0.1", "--dashboard-port", dashboard,
         "--num-cpus", "2", "--disable-usage-stats", "--dashboard-agent-listen-port", "52399",
         "--temp-dir", tempfile.mkdtemp(prefix="ray-job-", dir="/tmp")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_dashboard(address, head)
        job_env = json.dumps({"env_vars": {
            "RLSEDIT_CACHE": os.environ["RLSEDIT_CACHE"],
            "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "HF_HUB_OFFLINE": "1"}})
        submit_cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                      "--runtime-env-json", job_env, "--no-wait", "--", sys.executable, "-m",
                      "pipelines.grid", *smoke_args(tmp_path, "--set", "name=job-smoke",
                                                    "--set", "editors=[rlsedit]")]
        for _ in range(30):   # the job agent comes up a little after the dashboard
            submit = subprocess.run(submit_cmd, env=env, capture_output=True, text=True,
                                    timeout=300, cwd=ROOT)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(3)
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
        os.killpg(head.pid, signal.SIGTERM)   # --block stops its cluster on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def wait_for_dashboard(address: str, head: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the job API at `address` answers; fail if `head` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"no Ray dashboard at {address} after {timeout} s")
