"""The Hugging Face hub, asked once before a model or data set is loaded from it.

transformers and datasets retry a hub they cannot reach for 27-52 seconds and then end in a
ConnectionError or OSError traceback. require() asks first, in one request, and fails at once with
one line that names the flag, the reason and a local alternative. A name already in the local cache
is let through: the libraries read it from there without the hub.

    require("openai/gsm8k", "dataset", "--dataset", "Give a local file instead: ...")
"""

import os
import urllib.error
import urllib.request

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class HubUnavailable(ConnectionError):
    """The hub is needed for a name that is not cached, and it cannot be reached or is switched off."""


def unavailable_reason(timeout=5):
    """None when the hub answers; else why not, in a few words. The environment is read on each call."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode is set ({name}={os.environ[name]})"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # any status is an answer
    except (urllib.error.URLError, OSError) as e:  # timeouts are OSErrors too
        return f"{endpoint} cannot be reached ({getattr(e, 'reason', e)})"
    return None


def cached(repo_id, repo_type):
    """True when ``repo_id`` (a "model" or "dataset") is in the hub cache, or in datasets' own cache."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--" + repo_id.replace("/", "--"), "snapshots")
    if os.path.isdir(folder) and os.listdir(folder):
        return True
    if repo_type == "dataset":
        import datasets.config

        return os.path.isdir(os.path.join(datasets.config.HF_DATASETS_CACHE, repo_id.replace("/", "___")))
    return False


def require(repo_id, repo_type, flag, hint):
    """Return when ``repo_id`` can be loaded (cached, or the hub answers); else raise HubUnavailable
    naming ``flag`` and giving ``hint``, the local alternative."""
    if cached(repo_id, repo_type):
        return
    reason = unavailable_reason()
    if reason:
        raise HubUnavailable(f"{flag} {repo_id!r} is not a local path and not in the hub cache, and {reason}. {hint}")
