"""classification_reward: normalised exact match, nothing looser."""

import pytest

from gpg_vlm.rewards import classification_reward
from gpg_vlm.rewards.classification import normalize_text

CASES = [
    # (answer text, solution, expected)
    ("cat", "cat", 1.0),
    ("  Cat. ", "cat", 1.0),
    ("**CAT**", "cat", 1.0),
    ("'cat'", "cat", 1.0),
    ("The cat", "cat", 1.0),
    ("a cat", "cat", 1.0),
    ("an Abyssinian", "abyssinian", 1.0),
    ("American Pit Bull Terrier", "american_pit_bull_terrier", 1.0),
    ("american-pit bull_terrier", "american_pit_bull_terrier", 1.0),
    ("737-200", "737-200", 1.0),
    ("737 200", "737-200", 1.0),
    ("737-300", "737-200", 0.0),
    ("A330-200", "A330-200", 1.0),
    ("2012 Acura TL Sedan", "2012 Acura TL Sedan", 1.0),
    ("ＣＡＴ", "cat", 1.0),  # full-width letters (NFKC)
    ("kitty", ["cat", "kitty"], 1.0),  # list of accepted names
    ("cat or dog", "cat", 0.0),
    ("cat, dog", "cat", 0.0),
    ("cat and dog", ["cat", "dog"], 0.0),
    ("it is a cat", "cat", 0.0),  # no substring matching
    ("cats", "cat", 0.0),
    ("cat", "wildcat", 0.0),
    ("", "cat", 0.0),
    ("...", "...", 0.0),  # a name that normalises to nothing is never matched
    ("cat", "", 0.0),
    ("cat", None, 0.0),
    ("cat", 3, 0.0),
    ("cat", [None, 3], 0.0),
    ("the", "the", 1.0),  # a lone article is a word, not an article
]


@pytest.mark.parametrize("answer,solution,expected", CASES)
def test_classification_cases(answer, solution, expected):
    completion = f"<think>dog</think><answer>{answer}</answer>"
    assert classification_reward([completion], solution=[solution]) == [expected]


def test_class_named_only_in_think_scores_zero():
    assert classification_reward(["<think>cat</think><answer>dog</answer>"], solution=["cat"]) == [0.0]
    assert classification_reward(["<think>cat</think>"], solution=["cat"]) == [0.0]


def test_bare_answer_is_an_option():
    assert classification_reward(["cat"], solution=["cat"]) == [0.0]
    assert classification_reward(["cat"], solution=["cat"], accept_bare=True) == [1.0]
    assert classification_reward(["cat", "cat"], solution=["cat", "cat"], accept_bare=[True, False]) == [1.0, 0.0]


@pytest.mark.parametrize("text,expected", [
    ("  The  Golden_Retriever!! ", "golden retriever"),
    ("o'clock", "o'clock"),
    ("A-10", "a 10"),
    ("¿Qué?", "qué"),
    ("A T-shirt", "t shirt"),  # the article goes before a word, even one starting with a letter
    ("A\nC", "a c"),  # a list of choice letters keeps its "A"
    ("the B", "the b"),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_column_length_mismatch_names_the_column():
    with pytest.raises(ValueError, match="solution"):
        classification_reward(["<answer>cat</answer>"] * 2, solution=["cat"])
