"""Reward functions for GRPO on math word problems.

Three separate steps, so that training and evaluation grade alike:

    extract_answer(text) -> "42" or None      find the final answer, normalized (grpo_math/answers.py)
    is_correct(pred, gold) -> bool             compare two answers numerically (grpo_math/answers.py)
    correctness_reward(completions, answer)    score a batch for TRL's GRPOTrainer (here)

Every reward is a pure named function ``f(completions, **kwargs) -> list[float | None]``
that ``trl.GRPOTrainer(reward_funcs=[...])`` accepts as it is:

* ``completions`` are plain strings, or conversational (a list of ``{"role", "content"}``
  messages, of which the model's last one is graded);
* dataset columns such as ``answer`` arrive as keyword arguments, one value per completion;
* ``None`` means "cannot be graded" (no reference answer), and TRL skips it.

The function's name is its metric name (TRL logs ``rewards/<name>/mean``), and ``REWARDS``
at the bottom maps each name to its function. To add a reward, write a function with the
signature above and a one-line docstring giving its range, then add it to ``REWARDS``.

With tools (--tools calculator), a completion holds the model's tool calls, each tool's result
and then the model's answer; every reward here grades that last answer only, never a tool's
result. No reward pays for calling a tool as such: a reward for calls would teach the model to
call for its own sake (one call per answer, needed or not). A call pays only through the answer
it helps get right. Keep it so in a reward of your own; to watch tool use, read the logged
tools/call_frequency and tools/accuracy_with_call, not a reward.

>>> correctness_reward(["... so she has <SOLUTION>1,000</SOLUTION>"], answer=["1000"])
[1.0]
"""

import difflib
import re

import numpy as np

from grpo_math.answers import (  # noqa: F401  (re-exported: the rewards' inputs, graded the same everywhere)
    NUMBER_RE, REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_RE, SOLUTION_START, STOP_TAG,
    completion_text, extract_answer, is_correct, normalize_number, relative_error,
)

_FORMAT_RE = re.compile(
    r"^\s*" + re.escape(REASONING_START) + r".+?" + re.escape(REASONING_END)
    + r"\s*" + re.escape(SOLUTION_START) + r".+?" + re.escape(SOLUTION_END)
    + r"\s*(?:" + re.escape(STOP_TAG) + r")?\s*$",
    re.DOTALL,
)


def _golds(answer, n):
    """The reference answers as a list of length n (a single value is broadcast)."""
    if answer is None or isinstance(answer, (str, int, float)):
        return [answer] * n
    return list(answer)


# ---------------------------------------------------------------------------- rewards

def unique_chars_reward(completions, **kwargs):
    """len(set(text)): the number of distinct characters, a diversity dummy. Range [0, inf)."""
    return [float(len(set(completion_text(c)))) for c in completions]


def _per_completion(completions, answer, score):
    """score(text, gold) for each completion; None where there is no reference answer."""
    return [
        None if gold is None else score(completion_text(c), gold)
        for c, gold in zip(completions, _golds(answer, len(completions)))
    ]


def _similarity(text, gold):
    guess = extract_answer(text) or text
    ref = normalize_number(gold) or str(gold)  # "1,000" and 18.0 read as the guess would
    return 100.0 * difflib.SequenceMatcher(None, guess, ref).ratio()


def _partial_credit(text, gold):
    pred = extract_answer(text)
    return 1.0 if is_correct(pred, gold) else max(0.0, 1.0 - relative_error(pred, gold))


def _graded(text, gold):
    pred = extract_answer(text)
    if is_correct(pred, gold):
        return 3.0
    err = relative_error(pred, gold)
    return 1.5 if err <= 0.10 else 0.5 if err <= 0.20 else -0.5


def similarity_reward(completions, answer=None, **kwargs):
    """100 x difflib ratio of the final answer (else the whole text) to the reference. Range [0, 100]."""
    return _per_completion(completions, answer, _similarity)


def correctness_reward(completions, answer=None, **kwargs):
    """1.0 if the extracted answer equals the reference numerically, else 0.0. Range {0, 1}."""
    return _per_completion(completions, answer, lambda text, gold: float(is_correct(extract_answer(text), gold)))


def partial_credit_reward(completions, answer=None, **kwargs):
    """max(0, 1 - |pred - gold| / max(|gold|, 1)); 0.0 with no answer. Range [0, 1]."""
    return _per_completion(completions, answer, _partial_credit)


def graded_correctness_reward(completions, answer=None, **kwargs):
    """3.0 exact, 1.5 within 10 %, 0.5 within 20 %, -0.5 wrong or missing. Range [-0.5, 3]."""
    return _per_completion(completions, answer, _graded)


def format_exact_reward(completions, **kwargs):
    """3.0 for <start_working_out>...<end_working_out><SOLUTION>...</SOLUTION>, else 0. Range {0, 3}."""
    return [3.0 if _FORMAT_RE.match(completion_text(c)) else 0.0 for c in completions]


def format_approx_reward(completions, **kwargs):
    """+0.5 for each of the four format tags seen exactly once, -0.5 otherwise. Range [-2, 2]."""
    tags = (REASONING_START, REASONING_END, SOLUTION_START, SOLUTION_END)
    return [
        sum(0.5 if text.count(tag) == 1 else -0.5 for tag in tags)
        for text in map(completion_text, completions)
    ]


def number_extraction_reward(completions, **kwargs):
    """1.5 when the <SOLUTION> section holds a parseable number, else 0. Range {0, 1.5}."""
    out = []
    for c in completions:
        spans = SOLUTION_RE.findall(completion_text(c))
        out.append(1.5 if spans and NUMBER_RE.search(spans[-1]) else 0.0)
    return out


# hybrid_reward's parts and their weights. 'correct' and 'quality' exclude each other (quality
# applies only when no answer is extracted), so the maximum total is 3.85 - 0.25 = 3.6.
HYBRID_WEIGHTS = {
    "correct": 2.0,        # the extracted answer is right: the signal that matters
    "quality": 0.25,       # no answer extracted: distinct-word ratio, so degenerate text ranks lowest
    "length": 0.25,        # 20-300 words: some reasoning, no rambling
    "math": 0.25,          # an arithmetic expression such as "3 * 4"
    "steps": 0.25,         # step words (first, then, next, so, therefore, finally), 0.05 each
    "format": 0.5,         # the full structured format (format_exact_reward > 0)
    "numbers": 0.1,        # any number at all
    "calculation": 0.25,   # a worked calculation such as "3 * 4 = 12"
}
_STEP_WORDS = ("first", "then", "next", "so", "therefore", "finally")
_MATH_RE = re.compile(r"\d\s*[-+*/\u00d7\u00f7x]\s*\d")
_CALC_RE = re.compile(r"\d\s*[-+*/\u00d7\u00f7x]\s*\$?\d[\d,.]*\s*=\s*\$?-?\d")
_WORD_RE = re.compile(r"[a-z]+")


def hybrid_reward(completions, answer=None, **kwargs):
    """Correctness plus small bonuses for reasoning quality, see HYBRID_WEIGHTS. Range [0, 3.6]."""
    w = HYBRID_WEIGHTS
    out = []
    for c, gold in zip(completions, _golds(answer, len(completions))):
        text = completion_text(c)
        lowered = text.lower()
        words = _WORD_RE.findall(lowered)
        pred = extract_answer(text)
        score = 0.0
        if pred is None:
            score += w["quality"] * (len(set(words)) / len(words) if words else 0.0)
        elif gold is not None and is_correct(pred, gold):
            score += w["correct"]
        score += w["length"] * (20 <= len(words) <= 300)
        score += w["math"] * bool(_MATH_RE.search(text))
        score += min(w["steps"], 0.05 * len(set(_STEP_WORDS) & set(words)))
        score += w["format"] * bool(_FORMAT_RE.match(text))
        score += w["numbers"] * bool(NUMBER_RE.search(text))
        score += w["calculation"] * bool(_CALC_RE.search(text))
        out.append(score)
    return out


def stop_tag_bonus(completions, **kwargs):
    """0.5 when the completion closes with the </response> stop tag, else 0. Range {0, 0.5}."""
    return [0.5 if completion_text(c).rstrip().endswith(STOP_TAG) else 0.0 for c in completions]


# ---------------------------------------------------------------------------- combining

class CombinedReward:
    """Several rewards as one, weighted per batch. A class, not a closure, so that it pickles.

    method:
      uniform  mean of the rewards
      std      each reward weighted by 1 / its std over the batch (weights sum to 1)
      pca      projection on the first principal component of the batch's reward matrix
      l2       each reward divided by its L2 norm over the batch, then summed
    A None from one reward drops that reward for that completion; all None gives None.
    """

    METHODS = ("uniform", "std", "pca", "l2")

    def __init__(self, funcs, method="uniform", name=None):
        if method not in self.METHODS:
            raise ValueError(f"unknown combine method {method!r}; choose one of {self.METHODS}")
        if not funcs:
            raise ValueError("combine_rewards needs at least one reward function")
        self.funcs = list(funcs)
        self.method = method
        self.__name__ = name or f"combined_{method}_reward"

    def weights(self, scores):
        """Per-reward weights for a [n_completions, n_rewards] matrix with NaN for missing."""
        k = scores.shape[1]
        if self.method == "uniform":
            return np.full(k, 1.0 / k)
        # A missing score counts as its reward's batch mean (0 when the whole column is missing).
        present = ~np.isnan(scores)
        col_mean = np.where(present, scores, 0.0).sum(axis=0) / np.maximum(present.sum(axis=0), 1)
        filled = np.where(present, scores, col_mean)
        if self.method == "std":
            inv = 1.0 / np.maximum(filled.std(axis=0), 1e-6)
            return inv / inv.sum()
        if self.method == "l2":
            return 1.0 / np.maximum(np.linalg.norm(filled, axis=0), 1e-6)
        centered = filled - filled.mean(axis=0)
        if len(filled) < 2 or not centered.any():
            return np.full(k, 1.0 / k)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        pc = vt[0]
        return pc * np.sign(pc.sum() or 1.0)

    def __call__(self, completions, **kwargs):
        columns = [f(completions, **kwargs) for f in self.funcs]
        scores = np.array(
            [[np.nan if v is None else v for v in col] for col in columns], dtype=float
        ).T
        w = self.weights(scores)
        out = []
        for row in scores:
            present = ~np.isnan(row)
            if not present.any():
                out.append(None)
            elif self.method in ("uniform", "std"):
                out.append(float(row[present] @ w[present] / w[present].sum()))
            else:
                out.append(float(row[present] @ w[present]))
        return out


def combine_rewards(funcs, method="uniform", name=None):
    """One named reward from several; see CombinedReward for the methods."""
    return CombinedReward(funcs, method, name)


# ---------------------------------------------------------------------------- registry

REWARDS = {
    f.__name__: f
    for f in (
        unique_chars_reward,
        similarity_reward,
        correctness_reward,
        partial_credit_reward,
        graded_correctness_reward,
        format_exact_reward,
        format_approx_reward,
        number_extraction_reward,
        hybrid_reward,
        stop_tag_bonus,
    )
}

# The GSM8K recipe: reward name -> weight, ready for GRPOConfig(reward_weights=list(values)).
# Correctness dominates (max 2.0); the format terms (max 0.75 and +-0.5) teach the structure
# early on, when few answers are right; partial credit (max 0.5) gives a gradient to near misses.
GSM8K_REWARD_WEIGHTS = {
    "correctness_reward": 2.0,
    "format_exact_reward": 0.25,
    "format_approx_reward": 0.25,
    "partial_credit_reward": 0.5,
}


def get_reward_funcs(names):
    """Look up reward functions by name, with a clear error for an unknown one."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; available: {', '.join(REWARDS)}")
    return [REWARDS[n] for n in names]
