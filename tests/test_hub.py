"""grpo_math/hub.py: offline mode, an unreachable hub, the caches, and what counts as an answer.

Nothing here reaches the network: offline mode is set, or HF_ENDPOINT points at a closed local port
(connection refused at once), or urlopen is stood in.
"""

import io
import time
import urllib.error

import pytest

from grpo_math import hub

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


@pytest.fixture(autouse=True)
def online(monkeypatch, tmp_path):
    """No offline variable set and empty caches, whatever the machine running the tests has."""
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants
    import datasets.config

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


@pytest.mark.parametrize("name, value", [
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "yes"),   # case does not matter
    ("TRANSFORMERS_OFFLINE", "TRUE"),
    ("HF_HUB_OFFLINE", "On"),
])
def test_offline_mode_is_a_reason(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)  # offline is named first, before any request
    assert hub.unavailable_reason() == f"offline mode is set ({name}={value})"


@pytest.mark.parametrize("value", ["0", "", "off", "no"])
def test_offline_variable_set_false_is_not_offline(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda request, timeout: io.BytesIO())
    assert hub.unavailable_reason() is None


def test_unreachable_endpoint_is_a_reason(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    reason = hub.unavailable_reason(timeout=2)
    assert reason.startswith(f"{CLOSED_PORT} cannot be reached (") and "refused" in reason.lower()


def test_http_error_counts_as_an_answer(monkeypatch):
    # a 404 or 503 still means the hub is there; only no answer at all is a reason
    seen = []

    def fail(request, timeout):
        seen.append((request.full_url, request.get_method(), timeout))
        raise urllib.error.HTTPError(request.full_url, 503, "Service Unavailable", {}, None)

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example/")
    monkeypatch.setattr(hub.urllib.request, "urlopen", fail)
    assert hub.unavailable_reason(timeout=3) is None
    assert seen == [("https://hub.example", "HEAD", 3)]


def test_require_fails_fast_naming_flag_reason_and_hint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    start = time.perf_counter()
    with pytest.raises(hub.HubUnavailable) as e:
        hub.require("someorg/some-model", "model", "--model-name", "Give a local folder instead.")
    assert time.perf_counter() - start < 5
    assert str(e.value).startswith("--model-name 'someorg/some-model' is not a local path and not in the hub cache, "
                                   f"and {CLOSED_PORT} cannot be reached (")
    assert str(e.value).endswith(". Give a local folder instead.")
    assert isinstance(e.value, ConnectionError)  # callers that catch ConnectionError or OSError still do


def test_require_passes_when_the_hub_answers(monkeypatch):
    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda request, timeout: io.BytesIO())
    hub.require("someorg/some-model", "model", "--model-name", "hint")


CACHED = [
    pytest.param("hub/models--someorg--some-model/snapshots/abc123", "someorg/some-model", "model",
                 id="model in the hub cache"),
    pytest.param("hub/datasets--openai--gsm8k/snapshots/abc123", "openai/gsm8k", "dataset",
                 id="dataset in the hub cache"),
    pytest.param("datasets/openai___gsm8k", "openai/gsm8k", "dataset", id="dataset in datasets' own cache"),
]


@pytest.mark.parametrize("folder, repo_id, repo_type", CACHED)
def test_a_cached_name_is_let_through_offline(monkeypatch, online, folder, repo_id, repo_type):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.cached(repo_id, repo_type)
    (online / folder).mkdir(parents=True)
    assert hub.cached(repo_id, repo_type)
    hub.require(repo_id, repo_type, "--flag", "hint")  # no HubUnavailable: the libraries read the cache


@pytest.mark.parametrize("folder, repo_id, repo_type", [
    pytest.param("hub/models--someorg--some-model/snapshots", "someorg/some-model", "model",
                 id="an empty snapshots folder (an interrupted download)"),
    pytest.param("datasets/someorg___some-model", "someorg/some-model", "model",
                 id="datasets' cache does not hold models"),
    pytest.param("hub/models--openai--gsm8k/snapshots/abc123", "openai/gsm8k", "dataset",
                 id="a model of the same name is not the dataset"),
])
def test_not_cached(online, folder, repo_id, repo_type):
    (online / folder).mkdir(parents=True)
    assert not hub.cached(repo_id, repo_type)
