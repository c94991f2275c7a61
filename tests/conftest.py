import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EDIT_DATA = DATA / "counterfact" / "counterfact-train.json"
CORPUS = DATA / "agnews" / "test.tsv"


@pytest.fixture(scope="session", autouse=True)
def isolated_stores(tmp_path_factory):
    """Caches and the MLflow store go to a temporary folder, never the user's."""
    root = tmp_path_factory.mktemp("stores")
    os.environ["RLSEDIT_CACHE"] = str(root / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield root


@pytest.fixture(scope="session")
def tiny():
    from tasks.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster for the tests of one module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
