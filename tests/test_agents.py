"""agents.py: agent specs, prompt builders, expansion, voting, consistency, hidden-state mixing.

One behaviour per case; each case's id says why it exists, and the arithmetic behind an
expected value sits in a comment beside it.
"""

import pytest
import torch
from datasets import Dataset

from agents import (
    AGENT_SETS,
    SYSTEM_PROMPT,
    TOOL_AGENT_SETS,
    WORKED_EXAMPLES,
    aggregate_hidden_states,
    build_prompt,
    chat_prompt,
    consistency,
    expand_agents,
    get_agents,
    majority_vote,
    xml_prompt,
)
from rewards import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START, STOP_TAG, extract_answer

# The sets a count draws from: those that ask for a tool need --tools, so a count leaves them out.
ALL_NAMES = [name for set_name, agents in AGENT_SETS.items() if set_name not in TOOL_AGENT_SETS for name in agents]

# ---------------------------------------------------------------------------- get_agents

GET_AGENTS_CASES = [
    pytest.param(None, list(AGENT_SETS["core"]), id="None: the default set, core"),
    pytest.param("core", list(AGENT_SETS["core"]), id="set name: core"),
    pytest.param("strategies", list(AGENT_SETS["strategies"]), id="set name: strategies"),
    pytest.param("personas", list(AGENT_SETS["personas"]), id="set name: personas"),
    pytest.param("calculator", list(AGENT_SETS["calculator"]), id="set name: calculator (needs --tools calculator)"),
    pytest.param(2, ALL_NAMES[:2], id="count as int: the first 2 of core"),
    pytest.param("5", ALL_NAMES[:5], id="count as text: 4 of core, then the first of strategies"),
    pytest.param(" 3 ", ALL_NAMES[:3], id="count with spaces, as typed on a command line"),
    pytest.param(12, ALL_NAMES, id="count: all 12, no two sets share a name"),
    pytest.param("Be brief.|Show work.", ["agent0", "agent1"], id="'|' separated instructions"),
    pytest.param(["Be brief.", "Show work."], ["agent0", "agent1"], id="list of instructions"),
    pytest.param({"mine": "Be brief."}, ["mine"], id="dict: names kept"),
]


@pytest.mark.parametrize("spec, names", GET_AGENTS_CASES)
def test_get_agents(spec, names):
    agents = get_agents(spec)
    assert list(agents) == names
    assert all(isinstance(text, str) and text.strip() for text in agents.values())


def test_get_agents_instructions():
    # the instructions, not only the names, come through, stripped where they were split
    assert get_agents("Be brief. | Show work.") == {"agent0": "Be brief.", "agent1": "Show work."}
    assert get_agents(["a", "b"]) == {"agent0": "a", "agent1": "b"}
    assert get_agents("strategies") == AGENT_SETS["strategies"]


def test_get_agents_returns_a_copy():
    # editing the result must not change the documented sets
    get_agents("core")["extra"] = "x"
    get_agents(None).clear()
    assert len(AGENT_SETS["core"]) == 4


GET_AGENTS_ERRORS = [
    pytest.param(0, "agent count must be between 1 and 12, got 0", id="count 0"),
    pytest.param("13", "agent count must be between 1 and 12, got 13", id="count past the 12 there are"),
    pytest.param("nonsense", "unknown agent set 'nonsense'", id="unknown set name"),
    pytest.param("Core", "unknown agent set 'Core'", id="set names are case-sensitive"),
    pytest.param("Be brief.||Show work.", "non-empty instruction", id="empty instruction between bars"),
    pytest.param([], "non-empty instruction", id="empty list"),
    pytest.param({}, "non-empty instruction", id="empty dict"),
    pytest.param({"a": "  "}, "non-empty instruction", id="blank instruction"),
    pytest.param({"a": 3}, "non-empty instruction", id="instruction that is not text"),
]


@pytest.mark.parametrize("spec, message", GET_AGENTS_ERRORS)
def test_get_agents_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        get_agents(spec)


# ---------------------------------------------------------------------------- prompts

def test_xml_prompt_leaves_the_response_open():
    prompt = xml_prompt("Be brief.", "What is 2 + 2?")
    assert prompt == "<instruction>Be brief.</instruction>\n<question>What is 2 + 2?</question>\n<response>"
    # the model answers and closes the tag; extraction stops there and finds the answer
    assert extract_answer(prompt + " 2 + 2 = 4 " + STOP_TAG + " 9") == "4"


def test_chat_prompt_has_the_format_in_the_system_prompt():
    messages = chat_prompt("Be brief.", "What is 2 + 2?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT
    for tag in (REASONING_START, REASONING_END, SOLUTION_START, SOLUTION_END):
        assert tag in SYSTEM_PROMPT
    assert messages[1]["content"] == "Be brief.\n\nWhat is 2 + 2?"
    assert chat_prompt("i", "q", system_prompt="S")[0]["content"] == "S"


def test_build_prompt_styles():
    assert build_prompt("i", "q", "xml") == xml_prompt("i", "q")
    assert build_prompt("i", "q") == chat_prompt("i", "q")  # chat is the default
    with pytest.raises(ValueError, match="unknown prompt style 'yaml'"):
        build_prompt("i", "q", "yaml")


def test_worked_examples_open_the_chat_prompt_in_the_required_form():
    messages = chat_prompt("Be brief.", "What is 2 + 2?", examples=2)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    (q1, work1, a1), (q2, _, a2) = WORKED_EXAMPLES[:2]
    assert messages[1]["content"] == f"Be brief.\n\n{q1}"  # the agent's own instruction on the example
    shown = messages[2]["content"]
    assert shown == f"{REASONING_START}{work1}{REASONING_END}{SOLUTION_START}{a1}{SOLUTION_END}"
    assert extract_answer(shown) == a1 and extract_answer(messages[4]["content"]) == a2
    assert messages[-1]["content"] == "Be brief.\n\nWhat is 2 + 2?"  # the real question comes last
    assert chat_prompt("i", "q", examples=0) == chat_prompt("i", "q")


def test_worked_examples_open_the_xml_prompt_closed():
    prompt = xml_prompt("Be brief.", "What is 2 + 2?", examples=1)
    assert prompt.endswith(xml_prompt("Be brief.", "What is 2 + 2?"))
    shown = prompt[: -len(xml_prompt("Be brief.", "What is 2 + 2?"))]
    assert WORKED_EXAMPLES[0][0] in shown and shown.count(STOP_TAG) == 1  # the example's response is closed
    assert extract_answer(shown.split("<response>")[1]) == WORKED_EXAMPLES[0][2]


def test_worked_examples_reach_every_agent_prompt_and_are_bounded():
    out = expand_agents(QUESTIONS[:1], "core", style="chat", examples=1)
    assert all(len(r["prompt"]) == 4 for r in out)  # system, example question, example answer, question
    with pytest.raises(ValueError, match=f"between 0 and {len(WORKED_EXAMPLES)}, got 9"):
        build_prompt("i", "q", examples=9)


# ---------------------------------------------------------------------------- expand_agents

QUESTIONS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
AS_LIST = pytest.param(lambda rows: rows, id="list of dicts")
AS_DATASET = pytest.param(Dataset.from_list, id="datasets.Dataset")


@pytest.mark.parametrize("make", [AS_LIST, AS_DATASET])
def test_expand_agents_all(make):
    out = list(expand_agents(make(QUESTIONS), "core", sampling="all", style="xml"))
    names = list(AGENT_SETS["core"])
    assert len(out) == 5 * 4  # rows x agents
    # question-major order: each question once per agent, the agent column holds the name
    assert [r["agent"] for r in out] == names * 5
    assert [r["question"] for r in out] == [q["question"] for q in QUESTIONS for _ in names]
    assert [r["answer"] for r in out] == [q["answer"] for q in QUESTIONS for _ in names]  # columns kept
    assert out[1]["prompt"] == xml_prompt(AGENT_SETS["core"]["concise"], QUESTIONS[0]["question"])


@pytest.mark.parametrize("make", [AS_LIST, AS_DATASET])
def test_expand_agents_random(make):
    out = list(expand_agents(make(QUESTIONS), "personas", sampling="random", seed=3))
    assert [r["question"] for r in out] == [q["question"] for q in QUESTIONS]  # one row per question
    assert all(r["agent"] in AGENT_SETS["personas"] for r in out)
    for r in out:  # the chat prompt carries the chosen agent's instruction
        assert r["prompt"] == chat_prompt(AGENT_SETS["personas"][r["agent"]], r["question"])
    again = list(expand_agents(make(QUESTIONS), "personas", sampling="random", seed=3))
    assert [r["agent"] for r in again] == [r["agent"] for r in out]  # the same seed, the same draw


def test_expand_agents_random_uses_the_seed():
    # 40 questions over 4 agents: two seeds drawing the same 40 agents has odds 4^-40
    rows = QUESTIONS * 8
    draws = [[r["agent"] for r in expand_agents(rows, "core", sampling="random", seed=s)] for s in (0, 1)]
    assert draws[0] != draws[1]
    assert set(draws[0]) == set(AGENT_SETS["core"])


def test_expand_agents_list_and_dataset_agree():
    # the same seed draws the same agents whatever holds the rows
    rows = expand_agents(QUESTIONS, "core", sampling="random", seed=5)
    assert list(expand_agents(Dataset.from_list(QUESTIONS), "core", sampling="random", seed=5)) == rows


def test_expand_agents_returns_the_input_type():
    assert isinstance(expand_agents(QUESTIONS), list)
    assert isinstance(expand_agents(Dataset.from_list(QUESTIONS)), Dataset)


def test_expand_agents_errors():
    with pytest.raises(ValueError, match="agent sampling must be 'all' or 'random', got 'some'"):
        expand_agents(QUESTIONS, sampling="some")
    with pytest.raises(ValueError, match="unknown agent set"):
        expand_agents(QUESTIONS, "nonsense")
    with pytest.raises(ValueError, match="unknown prompt style"):
        expand_agents(QUESTIONS, style="yaml")


# ---------------------------------------------------------------------------- majority_vote

VOTE_CASES = [
    pytest.param(["3", "4", "4"], None, "4", id="plain majority"),
    pytest.param(["3", "4", "4"], [3, 1, 1], "3", id="weights: 3 > 1 + 1"),
    pytest.param(["3", "4", "4"], [2, 1, 1], "3", id="weighted tie 2 = 1 + 1 goes to the first seen"),
    pytest.param(["4", "3"], None, "4", id="tie goes to the first seen"),
    pytest.param(["3", "4"], None, "3", id="tie goes to the first seen, either order"),
    pytest.param([None, None, "5"], None, "5", id="None never wins, even two of them"),
    pytest.param([None, "no idea", None], None, None, id="nothing numeric gives None"),
    pytest.param([], None, None, id="no answers gives None"),
    pytest.param(["1,000", "7", "1000", "7", "1000.0"], None, "1000", id="'1,000' and '1000' vote together"),
    pytest.param(["\u22122", "-2", "2"], None, "-2", id="unicode minus votes with '-'"),
]


@pytest.mark.parametrize("answers, weights, expected", VOTE_CASES)
def test_majority_vote(answers, weights, expected):
    assert majority_vote(answers, weights) == expected


def test_majority_vote_weights_length():
    with pytest.raises(ValueError, match="3 answers but 2 weights"):
        majority_vote(["1", "2", "3"], [1, 1])


# ---------------------------------------------------------------------------- consistency

CONSISTENCY_CASES = [
    # pairs (1,1) agree, (1,2), (1,2) do not: 1/3
    pytest.param(["1", "1", "2"], 1 / 3, id="[1,1,2] -> 1/3"),
    # 6 pairs, the three among the 1s agree: 3/6
    pytest.param(["1", "1", "1", "2"], 0.5, id="[1,1,1,2] -> 3/6"),
    pytest.param(["1", "2", "3"], 0.0, id="all different -> 0"),
    pytest.param(["7", "7", "7"], 1.0, id="all equal -> 1"),
    # (1,000, 1000) agree: 1/1
    pytest.param(["1,000", "1000"], 1.0, id="normalized alike agree"),
    # (None, None) does not agree: 0/1
    pytest.param([None, None], 0.0, id="None agrees with nothing, not even None"),
    # (5,5) agrees, (5,None), (5,None) do not: 1/3
    pytest.param(["5", None, "5"], 1 / 3, id="a None counts against"),
    pytest.param(["5"], 1.0, id="one answer: no pairs, 1.0"),
    pytest.param([], 1.0, id="no answers: no pairs, 1.0"),
]


@pytest.mark.parametrize("answers, expected", CONSISTENCY_CASES)
def test_consistency(answers, expected):
    assert consistency(answers) == pytest.approx(expected)


# ---------------------------------------------------------------------------- aggregate_hidden_states

def test_aggregate_mean_of_equal_lengths():
    a, b = torch.ones(2, 3), torch.full((2, 3), 3.0)
    # (1 + 3) / 2 = 2
    assert torch.equal(aggregate_hidden_states([a, b]), torch.full((2, 3), 2.0))


def test_aggregate_pads_2d_with_zeros_to_the_longest():
    a, b = torch.ones(1, 2), torch.full((3, 2), 4.0)
    out = aggregate_hidden_states([a, b])
    assert out.shape == (3, 2)
    # row 0: (1 + 4) / 2 = 2.5; rows 1-2: a is zero-padded, (0 + 4) / 2 = 2
    assert torch.equal(out, torch.tensor([[2.5, 2.5], [2.0, 2.0], [2.0, 2.0]]))


def test_aggregate_pads_3d_along_the_length_axis():
    a, b = torch.ones(2, 1, 4), torch.full((2, 2, 4), 3.0)
    out = aggregate_hidden_states([a, b])
    assert out.shape == (2, 2, 4)  # [B, L, d], the longest L
    # position 0: (1 + 3) / 2 = 2; position 1: (0 + 3) / 2 = 1.5, for every batch row
    assert torch.equal(out[:, 0], torch.full((2, 4), 2.0))
    assert torch.equal(out[:, 1], torch.full((2, 4), 1.5))


def test_aggregate_weighted_mean():
    a, b = torch.zeros(1, 2), torch.full((1, 2), 4.0)
    # weights normalize to 1/4 and 3/4: 0 * 1/4 + 4 * 3/4 = 3
    assert torch.allclose(aggregate_hidden_states([a, b], weights=[1, 3]), torch.full((1, 2), 3.0))
    # a weight of zero leaves that agent out
    assert torch.allclose(aggregate_hidden_states([a, b], weights=[0.0, 2.0]), b)


def test_aggregate_one_tensor_is_itself():
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(aggregate_hidden_states([a]), a)


AGGREGATE_ERRORS = [
    pytest.param([], None, "at least one tensor", id="no tensors"),
    pytest.param([torch.ones(4)], None, "expected all", id="a 1-D tensor"),
    pytest.param([torch.ones(1, 2, 3, 4)], None, "expected all", id="a 4-D tensor"),
    pytest.param([torch.ones(2, 3), torch.ones(1, 2, 3)], None, "expected all", id="[L, d] mixed with [B, L, d]"),
    pytest.param([torch.ones(2, 3)] * 2, [1.0], "need 2 non-negative weights", id="too few weights"),
    pytest.param([torch.ones(2, 3)] * 2, [0.0, 0.0], "positive sum", id="weights summing to zero"),
]


@pytest.mark.parametrize("states, weights, message", AGGREGATE_ERRORS)
def test_aggregate_errors(states, weights, message):
    with pytest.raises(ValueError, match=message):
        aggregate_hidden_states(states, weights)


@pytest.mark.parametrize("spec", [
    2.0,        # a float is no count: refused, not truncated
    {1, 2},     # a set has no order, so no agent names
    "\u00b2",   # "superscript two" passes str.isdigit() but is no count
    True,       # a bool is an int to Python, not an agent count
])
def test_get_agents_refuses_odd_specs_clearly(spec):
    with pytest.raises(ValueError, match="unknown agent set"):
        get_agents(spec)


def test_aggregate_refuses_negative_weights():
    # [2, -1] sums to 1 > 0, but a negative weight would push the mean outside the inputs' range
    with pytest.raises(ValueError, match="non-negative"):
        aggregate_hidden_states([torch.ones(2, 3), torch.ones(2, 3)], weights=[2, -1])


def test_aggregate_refuses_mismatched_hidden_sizes():
    with pytest.raises(ValueError, match="differ in batch or hidden size"):
        aggregate_hidden_states([torch.ones(2, 3), torch.ones(2, 4)])
