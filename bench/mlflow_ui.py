"""What a user sees in the MLflow UI: `mlflow ui` on a tracking store, the page the grid's
closing message names (an experiment's runs in the chart view) rendered by headless
Chromium, a screenshot written.

    python -m bench.mlflow_ui --store sqlite:///$PWD/mlflow.db --experiment rlsedit-grid \\
        --out runs/mlflow-ui.png

Needs `chromium` (Debian: `apt-get install chromium`); the test that uses this
(tests/pipelines/test_mlflow_ui.py) skips without it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from pipelines.tracking import experiment_page

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SERVER_START_SECONDS = 300   # `mlflow ui` imports for a minute on a busy 2-core machine
RENDER_MS = 60_000           # virtual time the page gets to fetch runs and draw charts:
#                              20 s left them loading on a busy 2-core machine
WINDOW = "1800,1000"         # wide enough for chart titles beside MLflow's assistant panel


def browser() -> str | None:
    """The headless-capable browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_ui(store: str):
    """`mlflow ui` on `store` at a free local port; yields its base address."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not _answers(f"{base}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui on {store} did not start (exit {server.poll()})")
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, 15)   # the server and its workers (its own session)
        server.wait(timeout=60)


def visible_text(dom: str) -> str:
    """The text a reader sees in `dom`: no styles, scripts, tags or the comments React puts
    between the pieces of one text ("efficacy<!-- --> (<!-- -->2<!-- -->)")."""
    text = re.sub(r"<(style|script)\b.*?</\1>|<!--.*?-->", "", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def render(url: str, screenshot: Path | None = None) -> str:
    """The page's visible text after its scripts ran, in a browser that has never seen
    MLflow (a new profile: nothing remembered); with `screenshot`, also a PNG."""
    with tempfile.TemporaryDirectory() as profile:
        command = [browser(), "--headless", "--no-sandbox", "--disable-gpu",
                   "--hide-scrollbars", f"--user-data-dir={profile}",
                   f"--window-size={WINDOW}", f"--virtual-time-budget={RENDER_MS}"]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(command + [f"--screenshot={screenshot}", url], check=True,
                           capture_output=True, timeout=300)
        dom = subprocess.run(command + ["--dump-dom", url], check=True, capture_output=True,
                             text=True, timeout=300).stdout
    return visible_text(dom)


def main(argv=None) -> None:
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="tracking URI, e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="rlsedit-grid")
    parser.add_argument("--out", default="runs/mlflow-ui.png")
    opts = parser.parse_args(argv)
    if browser() is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    experiment = mlflow.MlflowClient(opts.store).get_experiment_by_name(opts.experiment)
    if experiment is None:
        sys.exit(f"no experiment {opts.experiment!r} in {opts.store}")
    with mlflow_ui(opts.store) as base:
        url = experiment_page(experiment.experiment_id, base)
        render(url, Path(opts.out))
    print(f"{url} -> {opts.out}")


if __name__ == "__main__":
    main()
