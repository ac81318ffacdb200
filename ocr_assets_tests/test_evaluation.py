"""Word-level scores: markup is ignored, words are counted as multisets, pages are micro-averaged."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocr_assets.evaluation import corpus_word_scores, word_scores, words


def test_words_lowercase_and_strip_punctuation():
    assert words("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]


def test_words_ignore_markdown_html_and_latex_markup():
    markdown = "# Results\n\n**Mean** cost: | Cost | 12.5 |\n|---|---|\n$$\\frac{1}{3}$$ <br/>"
    html = "<h1>Results</h1><p><b>Mean</b> cost:</p><table><tr><td>Cost</td><td>12.5</td></tr></table> 1 3"
    plain = "results mean cost cost 12 5 1 3"
    assert words(markdown) == words(html) == plain.split()


def test_words_unescape_entities_and_fold_compatibility_forms():
    assert words("R&amp;D &lt;td&gt; ﬁeld") == ["r", "d", "td", "field"]
    assert words("") == []


def test_bag_of_words_counts_repeats():
    precision, recall, f1 = word_scores("a a b", "a b b")
    assert precision == pytest.approx(2 / 3)
    assert recall == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 / 3)
    precision, recall, _ = word_scores("the the the", "the cat")
    assert precision == pytest.approx(1 / 3)
    assert recall == pytest.approx(1 / 2)


def test_perfect_zero_and_empty_cases():
    assert word_scores("## Cat sat", "sat cat") == (1.0, 1.0, 1.0)
    assert word_scores("dog", "cat") == (0.0, 0.0, 0.0)
    assert word_scores("", "") == (1.0, 1.0, 1.0)
    assert word_scores("| ** |", "") == (1.0, 1.0, 1.0)
    assert word_scores("", "cat") == (0.0, 0.0, 0.0)
    assert word_scores("cat", "") == (0.0, 0.0, 0.0)


def test_corpus_scores_are_micro_averaged():
    pairs = [("a b c d", "a b c d"), ("x", "y")]
    # 4 matched of 5 predicted and 5 reference words; a per-page mean would give 0.5.
    assert corpus_word_scores(pairs) == pytest.approx((0.8, 0.8, 0.8))
    assert corpus_word_scores(iter([("a b", "a b c d")])) == pytest.approx((1.0, 0.5, 2 / 3))
    assert corpus_word_scores([]) == (1.0, 1.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_scores_are_symmetric_and_bounded(a, b):
    p_ab, r_ab, f_ab = word_scores(a, b)
    p_ba, r_ba, f_ba = word_scores(b, a)
    assert (p_ab, r_ab) == pytest.approx((r_ba, p_ba))
    assert f_ab == pytest.approx(f_ba)
    assert 0.0 <= f_ab <= 1.0
    assert word_scores(a, a) == (1.0, 1.0, 1.0)


def test_markdown_image_placeholders_carry_no_words():
    from ocr_assets.evaluation import words

    assert words("Intro\n\n![figure](shard/3#105,738,614,1005)\n\nFigure 2: bars") == [
        "intro", "figure", "2", "bars"]
