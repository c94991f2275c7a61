import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EDIT_DATA = DATA / "counterfact" / "counterfact-train.json"
CORPUS = DATA / "agnews" / "test.tsv"


# Credentials of the S3 test server, never a real account's; set for the whole session so
# that every Ray cluster the tests start passes them on to its workers
TEST_CLOUD_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
TEST_BUCKET = "rlsedit-test"


@pytest.fixture(scope="session", autouse=True)
def isolated_stores(tmp_path_factory):
    """Caches and the MLflow store go to a temporary folder, never the user's; object
    storage is reached with TEST_CLOUD_ENV."""
    root = tmp_path_factory.mktemp("stores")
    os.environ["RLSEDIT_CACHE"] = str(root / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(TEST_CLOUD_ENV)
    yield root


@pytest.fixture(autouse=True)
def torch_threads_as_found():
    """Each test leaves torch's thread count as it found it: bench scripts called in-process
    set their own, and a float64 reduction's last bit depends on it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_folder():
    """A real S3-compatible server (moto) on 127.0.0.1 with the bucket TEST_BUCKET:
    `s3_folder(name)` is the URI of a folder in it, whose query points pyarrow there."""
    import logging

    from moto.server import ThreadedMotoServer
    from pyarrow.fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                 allow_bucket_creation=True).create_dir(TEST_BUCKET)
    yield lambda name: f"s3://{TEST_BUCKET}/{name}?endpoint_override={host}:{port}&scheme=http"
    server.stop()


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
