"""Answer normalization and metrics against hand-computed cases of the VQA evaluation rules."""

from __future__ import annotations

from typing import get_args

import pytest

from vpd.errors import VpdError
from vpd.metrics import (
    DEFAULT_THRESHOLDS,
    METRICS,
    Metric,
    aokvqa_da,
    aokvqa_mc,
    base_metric,
    count_match,
    exact_match,
    gqa_match,
    in_official_accuracy,
    mc_match,
    metric_family,
    nlvr2_match,
    normalize_answer,
    resolve_metric,
    right_answer,
    score_answer,
    short_answer,
    to_number,
    vqa_accuracy,
    yesno_match,
)
from vpd.records import Question


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The Dog", "dog"),  # lower-case, article dropped
        ("a cat", "cat"),
        ("an apple", "apple"),
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the official map stops at ten
        ("dont", "don't"),  # contractions map
        ("isnt", "isn't"),
        ("yes.", "yes"),  # trailing period stripped
        ("3.5", "3.5"),  # period in a decimal kept
        ("1,000", "1000"),  # digit,digit: punctuation dropped, not spaced
        ("red-white", "red white"),  # punctuation inside a word -> space
        ("red - white", "red white"),  # punctuation beside a space -> removed
        ("hello, world", "hello world"),
        ("what?!", "what"),
        ("  line\nbreak\t", "line break"),
        ("(left)", "left"),
        ("it's", "it's"),  # apostrophes are not punctuation in VQA
        (None, ""),
    ],
)
def test_normalize_answer(raw: str | None, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_ten_answers_leave_one_out() -> None:
    # 3 of 10 say "2": each of the 3 subsets missing a "2" has 2 matches (2/3), the 7
    # others have 3 (1.0): (3 * 2/3 + 7) / 10 = 0.9.
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    # 1 of 10: 9 subsets hold it (1/3 each), 1 does not: 9/30 = 0.3
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    # 2 of 10: 2 subsets with 1 match (1/3), 8 with 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # 4+ of 10: every subset has >= 3 matches
    assert vqa_accuracy("3", ["2"] * 6 + ["3"] * 4) == pytest.approx(1.0)
    assert vqa_accuracy("dog", ["cat"] * 10) == 0.0


def test_vqa_accuracy_with_fewer_than_ten_answers_by_hand() -> None:
    # Each value worked out by hand: for each answer left out, the matches among the
    # others over the full-credit bar (3, or n - 1 when n < 4), capped at 1; then the mean.
    # n = 2, both "dog": each other one matches, bar 1: 1.0 (the official bar 3: 1/3).
    assert vqa_accuracy("dog", ["dog", "dog"]) == 1.0
    # n = 3, all "dog": 2 matches, bar 2: 1.0 (official: 2/3).
    assert vqa_accuracy("dog", ["dog"] * 3) == 1.0
    # n = 3, one "dog": leave it out 0/2, leave a cat out 1/2 (twice): (0 + 1/2 + 1/2) / 3.
    assert vqa_accuracy("dog", ["dog", "cat", "cat"]) == pytest.approx(0.333333, abs=1e-6)
    # n = 4, one "dog" (bar 3, as official): 0 + 3 * 1/3 over 4 = 0.25.
    assert vqa_accuracy("dog", ["dog", "cat", "cat", "cat"]) == pytest.approx(0.25)
    # n = 5, two: leave a dog out 1/3 (x2), a cat 2/3 (x3): (2/3 + 2) / 5 = 8/15.
    assert vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 3) == pytest.approx(0.533333, abs=1e-6)
    # n = 6, three: leave a dog out 2/3 (x3), a cat 3/3 (x3): (2 + 3) / 6.
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 3) == pytest.approx(0.833333, abs=1e-6)
    # n = 9, one: 0 + 8 * 1/3 over 9 = 8/27; four: every subset keeps >= 3: 1.0.
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 8) == pytest.approx(0.296296, abs=1e-6)
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 5) == 1.0


def test_vqa_accuracy_normalizes_both_sides() -> None:
    answers = ["The Dog"] * 2 + ["dog."] + ["cat"] * 7
    assert vqa_accuracy("a dog", answers) == pytest.approx(0.9)


def test_vqa_strict_leaves_agreeing_answers_raw() -> None:
    # vqaEval.py normalizes only when the answers disagree: "Yes" never equals ten "yes".
    assert vqa_accuracy("Yes", ["yes"] * 10, strict=True) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10, strict=True) == 1.0  # whitespace: always
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"], strict=True) == 1.0


def test_vqa_normalizes_agreeing_answers_too() -> None:
    # lmms-eval's VQA v2 task normalizes every question: "Yes." is ten annotators' "yes".
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0  # both sides: "2" == "2"
    assert vqa_accuracy("The Dog!", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_vqa_accuracy_fewer_answers() -> None:
    assert vqa_accuracy("dog", ["dog"]) == 1.0  # single answer: exact match
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    # n=2, need min(3, 1)=1 match among the other one: subsets {cat}: 0, {dog}: 1 -> 0.5
    assert vqa_accuracy("dog", ["dog", "cat"]) == pytest.approx(0.5)
    # n=3, need 2: [dog, dog, cat]: leave dog -> 1/2, leave dog -> 1/2, leave cat -> 2/2
    assert vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("dog", []) == 0.0
    assert vqa_accuracy("", ["", ""]) == 0.0


def test_exact_match() -> None:
    assert exact_match("The red ball.", ["red ball"]) == 1.0
    assert exact_match("red", ["red ball"]) == 0.0
    assert exact_match("", [""]) == 0.0


def test_count_match_and_number_parsing() -> None:
    assert count_match("3", ["three"]) == 1.0
    assert count_match("3.0", ["3"]) == 1.0
    assert count_match("Three.", ["3"]) == 1.0
    assert count_match("twenty-one", ["21"]) == 1.0
    assert count_match("1,000", ["1000"]) == 1.0
    assert count_match("4", ["three"]) == 0.0
    assert count_match("many", ["3"]) == 0.0
    assert to_number("fifteen") == 15.0
    assert to_number("3 dogs") is None


def test_yesno_match() -> None:
    assert yesno_match("True", ["yes"]) == 1.0
    assert yesno_match("n", ["no"]) == 1.0
    assert yesno_match("Yes.", ["yes"]) == 1.0
    assert yesno_match("false", ["yes"]) == 0.0
    assert yesno_match("maybe", ["yes"]) == 0.0


def test_mc_match() -> None:
    choices = ["red", "blue", "green", "a yellow"]
    assert mc_match("Blue", choices, "blue") == 1.0
    assert mc_match("red", choices, "blue") == 0.0
    assert mc_match("purple", choices, "purple") == 0.0  # not one of the choices
    assert mc_match("B", choices, "blue") == 1.0  # option letter
    assert mc_match("(b)", choices, "blue") == 1.0
    assert mc_match("yellow", choices, "a yellow") == 1.0


def _q(**kw: object) -> Question:
    base = {"id": "q", "image": "x.png", "question": "?", "answers": ["2"]}
    base.update(kw)
    return Question.model_validate(base)


def test_resolve_metric_auto() -> None:
    assert resolve_metric(_q(dataset="vqav2")) == "vqa"
    assert resolve_metric(_q(dataset="gqa")) == "gqa"  # official, post-processed
    assert resolve_metric(_q(dataset="synth", meta={"qtype": "count"})) == "count"
    assert resolve_metric(_q(dataset="synth", meta={"qtype": "exists"}, answers=["no"])) == "yesno"
    assert resolve_metric(_q(dataset="synth", meta={"qtype": "attribute"}, answers=["red"])) == (
        "exact"
    )
    assert resolve_metric(_q(dataset="aokvqa", meta={"choices": ["a", "b"]})) == "aokvqa_da"
    assert resolve_metric(_q(dataset="aokvqa", meta={"choices": ["a"], "setting": "mc"})) == (
        "aokvqa_mc"
    )
    assert resolve_metric(_q(dataset="quiz", meta={"choices": ["a", "b"]})) == "mc"
    assert resolve_metric(_q(dataset="synth"), "count") == "count"
    assert resolve_metric(_q(dataset="synth", meta={"qtype": "multihop"}, answers=["3"])) == (
        "count"
    )
    assert resolve_metric(_q(dataset="okvqa", answers=["yes"] * 6 + ["no"] * 4)) == "vqa"
    with pytest.raises(VpdError):
        resolve_metric(_q(), "bleu")


def test_score_answer_dispatch() -> None:
    assert score_answer("three", _q(meta={"qtype": "count"}, answers=["3"])) == 1.0
    assert score_answer(None, _q()) == 0.0
    q = _q(dataset="quiz", answers=[], meta={"choices": ["cat", "dog"], "correct_choice_idx": 1})
    assert score_answer("dog", q) == 1.0
    assert score_answer("cat", q) == 0.0
    assert score_answer("2", _q(dataset="vqav2", answers=["2"] + ["3"] * 9)) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- post-processing
# One test per rule of the benchmarks' prediction post-processing (module docstring).


def test_short_answer_strips_trailing_periods() -> None:
    # LLaVA's convert_gqa_for_eval.py: text.rstrip(".")
    assert short_answer("no.") == "no"
    assert short_answer("no...") == "no"
    assert short_answer("3.5") == "3.5"  # only trailing ones
    assert short_answer("U.S.") == "u.s"


def test_short_answer_lower_cases() -> None:
    # convert_gqa_for_eval.py: .lower()
    assert short_answer("No") == "no"
    assert short_answer("Blue Sky") == "blue sky"


def test_short_answer_strips_whitespace_first() -> None:
    # model_vqa.py writes outputs.strip(): the period before a newline still goes.
    assert short_answer("  No.\n") == "no"


def test_short_answer_keeps_other_punctuation_and_articles() -> None:
    assert short_answer("No!") == "no!"
    assert short_answer("a bus") == "a bus"
    assert short_answer("yes,") == "yes,"
    assert short_answer(None) == ""


def test_gqa_scores_no_period_as_no_and_strict_does_not() -> None:
    q = Question(id="1", image="x", question="?", answers=["no"], dataset="gqa")
    assert score_answer("No.", q) == 1.0  # auto -> gqa, post-processed
    assert score_answer("No.", q, "gqa") == 1.0
    assert score_answer("No.", q, "gqa_strict") == 0.0  # eval.py on the raw string
    assert score_answer("no", q, "gqa_strict") == 1.0
    assert gqa_match("a bus", ["bus"]) == 0.0 and gqa_match(None, ["no"]) == 0.0


def test_aokvqa_da_normalizes_both_sides() -> None:
    answers = ["two dogs"] * 2 + ["dogs"] * 8
    assert aokvqa_da("2 Dogs.", answers) == 2 / 3  # unrounded
    assert aokvqa_da("2 Dogs.", answers, strict=True) == 0.0
    assert aokvqa_da("two dogs", answers, strict=True) == 2 / 3
    assert aokvqa_da("the", ["the"] * 3) == 0.0  # nothing left after normalization


def test_aokvqa_mc_compares_short_forms_of_both_sides() -> None:
    choices = ["Red", "blue", "green", "yellow"]
    assert aokvqa_mc("red.", choices, 0) == 1.0
    assert aokvqa_mc("red.", choices, 0, strict=True) == 0.0
    assert aokvqa_mc("Red", choices, 0, strict=True) == 1.0
    assert aokvqa_mc("B", choices, 1) == aokvqa_mc("B", choices, 1, strict=True) == 1.0


def test_nlvr2_strips_a_sentence_period() -> None:
    assert nlvr2_match("True.", ["True"]) == 1.0
    assert nlvr2_match("Yes.", ["True"]) == 1.0
    assert nlvr2_match("True.", ["True"], strict=True) == 0.0
    assert nlvr2_match("TRUE", ["True"], strict=True) == 1.0  # the script lower-cases


def test_strict_variants_are_declared_once() -> None:
    # The Literal the configs validate against and METRICS name the same metrics.
    assert set(get_args(Metric)) == {"auto", *METRICS}
    for m in ("vqa", "gqa", "aokvqa_da", "aokvqa_mc", "nlvr2"):
        strict = m + "_strict"
        assert base_metric(strict) == (m, True) and base_metric(m) == (m, False)
        assert DEFAULT_THRESHOLDS[strict] == DEFAULT_THRESHOLDS[m]
        assert metric_family(strict) == metric_family(m)
    assert base_metric("pope_strict") == ("pope_strict", False)  # no such variant
    with pytest.raises(VpdError):
        resolve_metric(_q(), "pope_strict")
    unbalanced = _q(dataset="gqa", meta={"isBalanced": False})
    assert not in_official_accuracy(unbalanced, "gqa_strict")


def test_right_answer_is_the_verifiers_rule() -> None:
    """Blank answers are never right; the threshold is the metric's unless given."""
    vqa = Question(id="v", image="x", question="?", answers=["red"] * 3 + ["blue"] * 7)
    count = Question(id="c", image="x", question="?", answers=["2"], meta={"qtype": "count"})
    assert right_answer("red", vqa, "vqa") == (score_answer("red", vqa, "vqa"), True)
    assert right_answer("green", vqa, "vqa") == (0.0, False)
    one = Question(id="o", image="x", question="?", answers=["red"] + ["blue"] * 9)
    score, ok = right_answer("red", one, "vqa")
    assert 0 < score < 1
    assert ok is (score >= DEFAULT_THRESHOLDS["vqa"])
    assert right_answer("red", one, "vqa", threshold=score) == (score, True)
    assert right_answer("red", one, "vqa", threshold=1.0) == (score, False)
    for blank in (None, "", "  \n"):
        assert right_answer(blank, count, "count") == (0.0, False)
    # Raw text counts as an answer even where normalization empties it (an article).
    article = Question(id="a", image="x", question="?", answers=["the"], meta={"qtype": "x"})
    assert right_answer("the", article, "exact")[1] is (score_answer("the", article, "exact") >= 1)
    assert right_answer(2, count, "count") == (1.0, True)
