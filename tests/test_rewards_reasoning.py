"""reasoning_reward and its number reader: choices, numbers, expressions, adversarial answers."""

import math

import pytest

from gpg_vlm.rewards import reasoning_reward
from gpg_vlm.rewards.numeric import close, value_of
from gpg_vlm.rewards.reasoning import answers_match

CV_CHOICES = ["3", "2", "1", "0"]  # CV-Bench Count: solution "(C)" = "1"
DEG = ["135°", "140°", "145°", "150°"]

CHOICE_CASES = [
    # (answer, solution, choices, expected)
    ("C", "(C)", CV_CHOICES, True),
    ("(C)", "(C)", CV_CHOICES, True),
    ("c", "(C)", CV_CHOICES, True),
    ("[C]", "(C)", CV_CHOICES, True),
    ("C.", "(C)", CV_CHOICES, True),
    ("C:", "(C)", CV_CHOICES, True),
    ("C) 1", "(C)", CV_CHOICES, True),
    ("(C) 1", "(C)", CV_CHOICES, True),
    ("The answer is C", "(C)", CV_CHOICES, True),
    ("The answer is (C).", "(C)", CV_CHOICES, True),
    ("Answer: C", "(C)", CV_CHOICES, True),
    ("Option C", "(C)", CV_CHOICES, True),
    ("1", "(C)", CV_CHOICES, True),  # the choice text
    ("1.0", "(C)", CV_CHOICES, True),  # the choice value
    ("C", "C", CV_CHOICES, True),
    ("C) 2", "(C)", CV_CHOICES, False),  # letter and text disagree
    ("C is right", "(C)", CV_CHOICES, False),
    ("A or C", "(C)", CV_CHOICES, False),
    ("A, C", "(C)", CV_CHOICES, False),
    ("B", "(C)", CV_CHOICES, False),
    ("E", "(E)", CV_CHOICES, False),  # letter beyond the choices
    ("Options", "(C)", CV_CHOICES, False),
    ("", "(C)", CV_CHOICES, False),
    # MathVista: the solution is the choice text
    ("145°", "145°", DEG, True),
    ("145", "145°", DEG, True),
    ("C", "145°", DEG, True),
    ("(B)", "145°", DEG, False),
    ("E", "E", ["A", "B", "C", "D", "E"], True),  # choices that are letters
    ("(E)", "E", ["A", "B", "C", "D", "E"], True),
    ("quarter", "quarter", ["half", "quarter", "o'clock", "quarter to", "quarter past"], True),
    ("quarter to", "quarter", ["half", "quarter", "o'clock", "quarter to", "quarter past"], False),
    ("yes", "Yes", ["Yes", "No"], True),
    ("A", "Yes", ["Yes", "No"], True),
    ("Yes or No", "Yes", ["Yes", "No"], False),
    ("Common water flea", "Common water flea", ["Tilapia", "Common water flea"], True),
    ("(E)", "(b)", ["(c)", "(d)", "(e)", "(a)", "(b)"], False),  # text "(e)" beats letter E
    ("(b)", "(b)", ["(c)", "(d)", "(e)", "(a)", "(b)"], True),
    ("C", "(Z)", CV_CHOICES, False),
    ("5", "-5", ["-5", "5"], False),  # text keys keep signs
    ("-5", "-5", ["-5", "5"], True),
    ("(((1)))", "(C)", CV_CHOICES, True),  # the value 1 selects choice C  # solution selects no choice
    ("C", "(C)", ["3", 2, "1"], False),  # malformed choices
]


@pytest.mark.parametrize("answer,solution,choices,expected", CHOICE_CASES)
def test_multiple_choice(answer, solution, choices, expected):
    assert answers_match(answer, solution, choices) is expected


FREE_CASES = [
    # (answer, solution, expected)
    ("140", "140°", True),
    ("140°", "140°", True),
    ("140^\\circ", "140°", True),
    ("140 degrees", "140°", True),
    ("x = 140", "140°", True),
    ("∠CED = 140°", "140°", True),
    ("180 - 40 = 140", "140°", True),
    ("141", "140°", False),
    ("8√{3}", "8√{3}", True),
    ("8\\sqrt{3}", "8√{3}", True),
    ("8√3", "8√{3}", True),
    ("\\sqrt{192}", "8√{3}", True),
    ("8", "8√{3}", False),
    ("13.86", "8√{3}", False),
    ("2√{3} cm", "2√{3}cm", True),
    ("2\\sqrt{3}\\text{ cm}", "2√{3}cm", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{√{3}}{2}", True),
    ("\\dfrac{2\\sqrt{5}}{5}", "\\frac{2}{5}√{5}", True),
    ("2/5√5", "\\frac{2}{5}√{5}", True),
    ("0.4", "\\frac{2}{5}", True),
    ("2\\pi", "2π", True),
    ("2pi", "2π", True),
    ("6.283185", "2π", True),  # within relative 1e-6
    ("6.28", "2π", False),
    ("2400π cm²", "2400πcm^{2}", True),
    ("1+√3 hours", "(√{3}+1)小时", True),
    ("4", 4, True),
    ("four", 4, True),
    ("Four", "4", True),
    ("twenty-one", 21, True),
    ("4.0", 4, True),
    ("4.000001", 4, True),  # relative difference 2.5e-7 <= 1e-6
    ("4.0001", 4, False),
    ("1,000", "1000", True),
    ("1,000.5", 1000.5, True),
    ("3,5", 3.5, False),
    ("3 or 5", 5, False),
    ("4 and 5", 5, False),
    ("5 or more", 5, False),
    ("2x", 2, False),
    ("2 3", 6, False),
    ("5 apples", 5, True),
    ("-4.3", "-4.3", True),
    ("4.3", "-4.3", False),
    ("0", "0.0", True),
    ("0.0000001", 0, False),
    ("1e3", 1000, True),
    ("x+1", "1+x", True),  # math-verify, symbolic
    ("2x+1", "1+2x", True),
    ("x+2", "1+x", False),
    ("Yes", "yes", True),
    ("x", "-x", False),
    ("(x)", "x", True),  # math-verify: the same expression
    ("x", "(x)", True),
    ("No", "yes", False),
    ("", "5", False),
    ("5", "", False),
    ("5", None, False),
    ("5", True, False),
    ("5", ["5"], False),
    ("C", "(C)", True),  # letter solution without choices
    ("(C)", "C", True),
    ("C) 1", "(C)", False),
    ("D", "(C)", False),
]


@pytest.mark.parametrize("answer,solution,expected", FREE_CASES)
def test_free_form(answer, solution, expected):
    assert answers_match(answer, solution) is expected


@pytest.mark.parametrize("answer,solution,precision,expected", [
    ("1.23", "1.2", 1, True),  # MathVista rounds the prediction to the precision
    ("1.26", "1.2", 1, False),
    ("1.23", "1.2", None, False),
    ("1.234", "1.23", 2.0, True),
    ("1.234", "1.23", True, False),  # a bool is not a precision
])
def test_precision(answer, solution, precision, expected):
    assert answers_match(answer, solution, None, precision) is expected


def test_numbers_in_think_are_not_read():
    completions = [
        "<think>so the answer is 5</think><answer>6</answer>",
        "<think>5</think>",
        "<think>5</think><answer>5</answer>",
    ]
    assert reasoning_reward(completions, solution=[5, 5, 5]) == [0.0, 0.0, 1.0]


def test_choices_column_per_row():
    completions = ["<answer>C</answer>", "<answer>12</answer>"]
    assert reasoning_reward(completions, solution=["(C)", "12"], choices=[CV_CHOICES, None]) == [1.0, 1.0]


@pytest.mark.parametrize("text,expected", [
    ("140°", 140.0),
    ("8√{3}", 8 * math.sqrt(3)),  # 13.8564...
    ("2√{2}-2", 2 * math.sqrt(2) - 2),
    ("60√{3}+1", 60 * math.sqrt(3) + 1),
    ("\\frac{10√{3}}{3}m", 10 * math.sqrt(3) / 3),
    ("(√{3}+1)小时", math.sqrt(3) + 1),
    ("16π平方米", 16 * math.pi),
    ("5cm^2^", 5.0),
    ("\\sqrt[3]{8}", 2.0),
    ("3(√2+1)", 3 * (math.sqrt(2) + 1)),
    ("2^{10}", 1024.0),
    ("50%", 50.0),
    ("ninety nine", 99.0),
    ("one hundred", None),
    ("2^{999}", None),  # exponent cap
    ("\\frac{1}{0}", None),
    ("√{-1}", None),
    ("(-8)^{0.5}", None),  # complex
    ("(" * 40 + "1" + ")" * 40, None),  # nesting cap
    ("9" * 300, None),  # length cap
    ("[2014, 2016]", None),
    ("", None),
])
def test_value_of(text, expected):
    got = value_of(text)
    assert (got is None) if expected is None else close(got, expected, 1e-12)


def test_a_multi_letter_solution_is_not_its_last_letter():
    # "A\nC" once normalised to "c" (the "A" read as an article), so "C" alone scored
    assert not answers_match("C", "A\nC")
    assert answers_match("A C", "A\nC")
