import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
GSM8K_DIR = os.path.join(SHARED_DATA, "gsm8k")
QWEN_TOKENIZER_DIR = os.path.join(SHARED_DATA, "qwen-tokenizer")


@pytest.fixture
def gsm8k_dir():
    if not os.path.exists(os.path.join(GSM8K_DIR, "test.jsonl")):
        pytest.skip(f"GSM8K files not found at {GSM8K_DIR} (a clone without ../shared/data)")
    return GSM8K_DIR


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more threads only wait on each other on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
