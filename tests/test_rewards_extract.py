"""Answer extraction modes (rewards/extract.py) and plain-text maths in the normalisation."""

from __future__ import annotations

import random

import pytest

from gpg_vlm.rewards import classification_reward, reasoning_reward
from gpg_vlm.rewards.extract import as_tagged, extract, lenient_answer
from gpg_vlm.rewards.numeric import value_of

LENIENT = [
    # completion, task, (answer, step)
    ("<think>x</think><answer>5</answer>", "math", ("5", "tag")),
    ("<answer></answer> The answer is 5.", "math", ("", "tag")),  # a tag is final, even empty
    ("so $x = \\boxed{\\frac{1}{2}}$ and more", "math", ("\\frac{1}{2}", "boxed")),
    ("\\boxed{a{b}c} then \\boxed{7}", "math", ("7", "boxed")),  # the last one
    ("\\boxed{unclosed", "math", (None, "none")),
    ("Therefore, the answer is 40.", "math", ("40", "phrase")),
    ("The answer is 3.5 cm.", "math", ("3.5 cm", "phrase")),
    ("The answer is 1,000.", "math", ("1,000", "phrase")),
    ("Final answer: **12**", "math", ("12", "phrase")),
    ("The correct option letter is C. 58.", "choice", ("C", "phrase")),
    ("The correct option is therefore (B).", "choice", ("(B)", "phrase")),
    ("So the answer is no, there are not more buses.", "choice", ("no", "phrase")),
    ("The answer is (B) 38.</s>", "choice", ("(B) 38", "phrase")),
    ('The correct option letter for the best score is "C," which is the mic.', "choice", ("C", "phrase")),
    ("The answer is [1, 2], as shown", "math", ("[1, 2]", "phrase")),
    ("Counting them:\n1, 2, 3.\nSo there are 3 bags", "counting", ("3", "last_line")),
    ("Adding up, 2 + 3 = 5\n\nI hope this helps!", "math", ("5", "last_line")),
    ("Looking at the options\n(C)", "choice", ("C", "last_line")),
    ("**B**", "choice", ("B", "last_line")),
    ("It is a bag", "classification", ("It is a bag", "last_line")),
    ("bag.", "classification", ("bag", "last_line")),
    ("The box is [10, 20, 30, 40]", "grounding", ("The box is [10, 20, 30, 40]", "last_line")),
    ("I cannot see a box", "grounding", (None, "none")),
    ("A cat sits there", "choice", (None, "none")),  # an article is not a letter answer
    ("<think>the answer is 5</think>", "math", ("5", "phrase")),  # all reasoning: its explicit answer
    ("<think>the answer is 5</think>I am not sure.", "math", (None, "none")),  # else never read inside
    ("", "math", (None, "none")),
]


@pytest.mark.parametrize("completion,task,expected", LENIENT)
def test_lenient_steps(completion, task, expected):
    assert lenient_answer(completion, task) == expected


def test_strict_is_the_training_rule_and_lenient_starts_with_it():
    assert extract("The answer is 5.", "strict") == (None, "none")
    assert extract("<answer>5</answer>", "strict") == ("5", "tag")
    assert extract("5", "strict", accept_bare=True) == ("5", "bare")
    assert extract([{"role": "assistant", "content": "The answer is 5."}], "lenient") == ("5", "phrase")


@pytest.mark.parametrize("value", [None, 5, b"the answer is 5", {"a": 1}, [1, 2], [{}], object()])
def test_extraction_never_raises_on_any_value(value):
    for mode in ("strict", "lenient"):
        answer, step = extract(value, mode)
        assert answer is None or isinstance(answer, str)


def test_extraction_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "{", "}", "the answer is",
                "(B)", "B.", "3.5", "-2", "\n", " ", ",", "\udcff", "\x00", "**", '"', "$"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        for task in ("math", "choice", "classification", "grounding", "counting"):
            answer, _ = lenient_answer(text, task)
            assert answer is None or "<answer>" not in answer.lower()  # as_tagged stays one pair


def test_huge_completion_is_bounded():
    text = "x " * 2_000_000 + "\nThe answer is 7."
    assert lenient_answer(text, "math") == ("7", "phrase")


def test_as_tagged_feeds_the_strict_rewards():
    answer, _ = lenient_answer("Thus the answer is 2sqrt(3).", "math")
    assert reasoning_reward([as_tagged(answer)], ["2√{3}"]) == [1.0]
    assert reasoning_reward([as_tagged(None)], ["2√{3}"]) == [0.0]
    assert classification_reward([as_tagged(lenient_answer("bag.", "classification")[0])], ["bag"]) == [1.0]


# ---- plain-text maths reads like its LaTeX form (both modes: it is in the normalisation) ----

SAME = [("2sqrt(3)", "2√{3}"), ("2 sqrt 3", "2\\sqrt{3}"), ("sqrt(3)/2", "\\frac{\\sqrt{3}}{2}"),
        ("3sqrt(2)/2", "\\frac{3\\sqrt{2}}{2}"), ("4*sqrt(3)", "4√3"), ("SQRT(3)", "√3"),
        ("2sqrt3 cm", "2√{3}cm"), ("x = 2sqrt(3)", "2√{3}"), ("sqrt(sqrt(16))", "2"),
        ("2^(1/2)", "√2"), ("2pi", "2π")]
NOT_A_NUMBER = ["isqrt(3)", "sqrtsqrt3", "sqrts(3)", "2 sqrt", "sqrt", "sqrt(-4)", "squirt(3)",
                "sqrt(3", "sqrt(3) or 2", "sqrt(" * 40 + "3" + ")" * 40]


@pytest.mark.parametrize("plain,latex", SAME)
def test_plain_text_maths_equals_its_latex_form(plain, latex):
    assert value_of(plain) == pytest.approx(value_of(latex))
    for completion in (f"<answer>{plain}</answer>", f"The answer is {plain}."):
        assert reasoning_reward([completion], [latex], accept_bare=False)[0] == (
            1.0 if completion.startswith("<answer>") else 0.0)  # strict needs the tag
        answer, _ = lenient_answer(completion, "math")
        assert reasoning_reward([as_tagged(answer)], [latex]) == [1.0]


@pytest.mark.parametrize("text", NOT_A_NUMBER)
def test_adversarial_roots_are_not_numbers(text):
    assert value_of(text) is None


def test_sqrt_word_does_not_make_a_wrong_answer_right():
    assert reasoning_reward(["<answer>3sqrt(2)</answer>"], ["2√{3}"]) == [0.0]
    assert reasoning_reward(["<answer>2sqrt(3)+1</answer>"], ["2√{3}"]) == [0.0]


# ---- lenient steps that read the item's options (lead, option_text) and their limits ----

YN = ["Yes", "No"]
WORDS = ["decrease", "nothing", "increase", "none of the above"]
TIMES = ["half", "quarter", "o'clock", "quarter to", "quarter past"]
ANGLES = ["25°", "30°", "40°", "50°"]
WITH_OPTIONS = [
    # completion, choices, (answer, step)
    ("No, the function is not injective on R.", YN, ("No", "lead")),
    ("yes. The pieces are cut into triangles", YN, ("Yes", "lead")),
    ("B. The length of BD is about 4.", ANGLES, ("(B)", "lead")),  # the rest names no option
    ("A\nThere are more buses behind the plane.", YN, ("(A)", "lead")),
    ("(C) 40°", ANGLES, ("(C)", "lead")),  # letter and its own text agree
    ("If the trees died, the population would most likely decrease.", WORDS, ("decrease", "option_text")),
    ("The time shown is quarter past.", TIMES, ("quarter past", "option_text")),  # not also "quarter"
    ("The answer is (D) 145°.", ANGLES, ("(D)", "phrase")),  # 145° is no option: the letter is the choice
    ("The answer is (B) 40°.", ANGLES, ("(B) 40°", "phrase")),  # another option's text: left to the reward
    ("Answer: There are 5 objects left after that.", None, ("5", "phrase")),  # prose with one number
    ("Please give the correct option letter, e.g., A, B, C, D, at the end.\nAnswer: (E) Science.", None,
     ("(E) Science", "phrase")),  # a phrase followed by punctuation is passed over
    ("So the answer is definitely no, there are none.", YN, ("no", "phrase")),
    ('The correct answer to the question "Is it rough?" is (B), no.', YN, ("(B)", "phrase")),  # not its "Is"
    ("Coral is not the roughest; it ranks 38th of 40.", YN, (None, "none")),  # numbers are no yes/no answer
    ("The angle is 30 degrees, half of 60.", ANGLES, ("30", "last_line")),  # a value that is an option
]


@pytest.mark.parametrize("completion,choices,expected", WITH_OPTIONS)
def test_lenient_steps_with_options(completion, choices, expected):
    task = "choice" if choices else "math"
    assert lenient_answer(completion, task, choices) == expected
    assert extract(completion, "lenient", task, choices=choices) == expected
    assert extract(completion, "strict", task, choices=choices) == (None, "none")  # strict ignores them


# Wrong or non-answers that the option steps must not turn into a right one (solution first).
NOT_RIGHT = [
    ("Yes", "Yes, no, maybe: it is hard to say.", YN),  # both options named: no answer
    ("No", "Yes or no, I cannot tell.", YN),
    ("Yes", "Nobody knows.", YN),  # "No" inside a word
    ("Yes", "A man stands there. It is not clear.", YN),  # an article is not the letter A
    ("quarter", "It is quarter past.", TIMES),  # the longer option is the one named
    ("25°", "(B) 25°", ANGLES),  # a letter with another option's text is a contradiction
    ("25°", "(E) 25°\n(F) 50°", ANGLES),  # a letter beyond the options (a continued list)
    ("decrease", "decrease increase nothing none of the above", WORDS),  # listing every option
    ("Yes", "", YN),
    ("No", "C", YN),  # a letter beyond two options
]


@pytest.mark.parametrize("solution,completion,choices", NOT_RIGHT)
def test_option_steps_do_not_accept_wrong_answers(solution, completion, choices):
    answer, _ = lenient_answer(completion, "choice", choices)
    assert reasoning_reward([as_tagged(answer)], [solution], choices=[choices]) == [0.0]


def test_option_steps_accept_the_right_answer_as_a_control():
    # the positive twin of NOT_RIGHT's cases: the same readers do give credit when earned
    assert reasoning_reward([as_tagged(lenient_answer("No, it is not.", "choice", YN)[0])], ["No"],
                            choices=[YN]) == [1.0]
    assert reasoning_reward([as_tagged(lenient_answer("(A) 25°", "choice", ANGLES)[0])], ["25°"],
                            choices=[ANGLES]) == [1.0]
    assert reasoning_reward([as_tagged(lenient_answer("It is quarter past.", "choice", TIMES)[0])],
                            ["quarter past"], choices=[TIMES]) == [1.0]


def test_options_do_not_change_a_tagged_or_boxed_answer():
    assert lenient_answer("No. <answer>(A)</answer>", "choice", YN) == ("(A)", "tag")
    assert lenient_answer("Yes, so \\boxed{B}", "choice", YN) == ("B", "boxed")


# ---- numbers the question states, option lists, folded option names ----

def test_numbers_the_question_states_are_passed_over_when_others_remain():
    question = "How many bars have values below 40?"
    assert lenient_answer("There are 3 bars with values below 40.", "math", question=question) == ("3", "last_line")
    assert lenient_answer("There are 3 bars with values below 40.", "math") == ("40", "last_line")  # control
    # the answer may equal a stated number: with nothing else on the line it is still read
    assert lenient_answer("It is 40.", "math", question=question) == ("40", "last_line")
    assert lenient_answer("Answer: 3 bars are below 40", "math", question=question) == ("3", "phrase")
    wrong = lenient_answer("There are 5 bars with values below 40.", "math", question=question)[0]
    assert reasoning_reward([as_tagged(wrong)], ["3"]) == [0.0]


def test_an_opening_option_list_is_no_choice():
    assert lenient_answer("(A) yes\n(B) no\n(C) maybe", "choice", YN) == (None, "none")
    assert lenient_answer("(A) yes\nbecause it is larger", "choice", YN) == ("(A)", "lead")  # control


def test_option_names_fold_case_hyphens_and_plurals():
    options = ["Baseline", "Diffusion", "PDE-Refiner", "Pushforward"]
    assert lenient_answer("The PDE Refiner has the lowest loss.", "choice", options) == ("PDE-Refiner", "option_text")
    lobes = ["Inferior lobes", "Cardiac notch", "Superior lobes", "Middle lobe"]
    assert lenient_answer("The largest part is the superior lobe.", "choice", lobes) == ("Superior lobes", "option_text")
    # folding never joins two different words: "superior" alone names no option
    assert lenient_answer("The largest part is the superior one.", "choice", lobes) == (None, "none")


def test_chinese_final_answer_phrases():
    angles = ["30°", "32°", "36°", "40°"]
    assert lenient_answer("所以∠ADE的度数为36°。\n\n答案:C", "choice", angles) == ("C", "phrase")
    assert lenient_answer("因此，CD的长为5，选项A正确。", "choice", ["5", "6", "8", "10"]) == ("A", "phrase")
    assert lenient_answer("答案是 12", "math") == ("12", "phrase")


# ---- a <think> the model never closed ends at its answer tag (lenient only) ----

OPEN_THINK = [
    # completion, lenient (answer, step); strict reads none of these
    ("<think> so it is C\n<answer>C</answer>", ("C", "tag")),  # R1-style, "</think>" forgotten
    ("<think> a </think> b <think> x <answer>D</answer>", ("D", "tag")),  # the trailing open one
    ("<think> so it is 5", (None, "none")),  # no stated answer: the open block is reasoning
    ("<think> 40 + 5 = 45\nThus the angle is 45", (None, "none")),  # steps 4-6 never read it
    ("<think> ... the answer is 5.", ("5", "phrase")),  # an explicit final answer is read
    ("<think> ... Thus x is \\boxed{25}.", ("25", "boxed")),  # base models that never close
    ("<think>\\boxed{3}</think> so 4", ("4", "last_line")),  # a closed block stays hidden
    ("<think>\\boxed{3}</think>", ("3", "boxed")),  # ... unless nothing is outside it
    ("<think> 5 <answer>", (None, "none")),  # an unclosed answer tag is no answer
]


@pytest.mark.parametrize("completion,expected", OPEN_THINK)
def test_open_think_ends_at_the_answer_tag_in_lenient_mode_only(completion, expected):
    assert lenient_answer(completion, "math") == expected
    assert extract(completion, "strict") == (None, "none")


def test_closed_think_hides_its_answer_unless_the_completion_is_all_reasoning():
    # strict (the training reward) never reads a closed think block: the check-reward hack
    # "the answer only inside <think>" scores 0 there
    for completion in ("<think><answer>5</answer></think>", "<think><answer>5</answer></think> 7"):
        assert extract(completion, "strict") == (None, "none")
    # lenient reads it only when the model wrote nothing else, and only an explicit answer
    assert lenient_answer("<think><answer>5</answer></think> 7", "math") == ("7", "last_line")
    assert lenient_answer("<think>so <answer>5</answer>\n</think>", "math") == ("5", "tag")
    assert lenient_answer("<think>Thus x is \\boxed{22}.</think>", "math") == ("22", "boxed")
    assert lenient_answer("<think>so it is 5</think>", "math") == (None, "none")  # no last-line guess
    answer, _ = lenient_answer("<think>it is 40, so <answer>30</answer></think>", "math")
    assert reasoning_reward([as_tagged(answer)], ["40"]) == [0.0]  # a wrong answer still scores 0
    assert reasoning_reward([as_tagged(answer)], ["30"]) == [1.0]  # control


def test_open_think_repair_does_not_make_a_wrong_answer_right():
    answer, _ = lenient_answer("<think> it is 40, so\n<answer>30</answer>", "math")
    assert answer == "30"
    assert reasoning_reward([as_tagged(answer)], ["40"]) == [0.0]
    assert reasoning_reward([as_tagged(answer)], ["30"]) == [1.0]  # control


# ---- LaTeX units after a number (both modes: it is in the normalisation) ----

UNITS = [("48", "48 \\mathrm{cm}^3"), ("127.2", "Volume $=127.2 \\mathrm{~cm}^{3}$"),
         ("32cm³", "32 \\mathrm{cm}^3"), ("254.47", "254.47 \\mathrm{~cm}^{2}")]


@pytest.mark.parametrize("answer,solution", UNITS)
def test_a_latex_unit_with_an_exponent_is_a_unit(answer, solution):
    assert value_of(solution) == pytest.approx(value_of(answer))
    assert reasoning_reward([f"<answer>{answer}</answer>"], [solution]) == [1.0]
    wrong = str(value_of(answer) + 1)
    assert reasoning_reward([f"<answer>{wrong}</answer>"], [solution]) == [0.0]


def test_an_exponent_after_a_space_keeps_its_value():
    assert value_of("2 ^3") == value_of("2^3") == 8.0
    assert value_of("5 \\mathrm{x}^2") is None  # a one-letter word is a variable, not a unit
