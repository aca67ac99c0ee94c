import os
import sys

import pytest

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
