"""Word-level scores of recognized text against ground truth, blind to markup.

Pages come back as Markdown with HTML tables and LaTeX formulas; the ground truth is plain
words. Both sides go through `words`, so only the words themselves are compared: a bag of
words (multiset) per page, micro-averaged over a corpus.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

# HTML/XML tags such as <td>, </tr>, <br/>, <table border="1">.
_TAG = re.compile(r"<[^<>]{0,200}>")
# Markdown images (`![figure](page#x0,y0,x1,y1)`): placeholders for regions kept as pictures.
_MD_IMAGE = re.compile(r"!\[[^\]]{0,200}\]\([^)]{0,500}\)")
# LaTeX control words (\frac, \int, \alpha) carry no page words.
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
# A word: a run of letters or digits; everything else (punctuation, #, |, $, *, _) separates.
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Split text into lowercase word tokens, dropping punctuation and Markdown/HTML/LaTeX markup.

    Letters and digits are kept; Markdown image placeholders, tags (`<td>`), LaTeX commands (`\\frac`), entities (`&amp;`),
    and symbols such as `#`, `|`, `$$`, `**` are removed, so the same words compare equal
    whatever markup surrounds them.
    """
    if not text:
        return []
    # NFKC folds ligatures and full-width forms that OCR models sometimes emit.
    text = _MD_IMAGE.sub(" ", text)
    text = unicodedata.normalize("NFKC", html.unescape(_TAG.sub(" ", text)))
    text = _LATEX_COMMAND.sub(" ", text)
    return _WORD.findall(text.lower())


def _counts(predicted: str, reference: str) -> tuple[int, int, int]:
    """(matched, predicted, reference) word counts of one page."""
    pred = Counter(words(predicted))
    ref = Counter(words(reference))
    matched = sum((pred & ref).values())
    return matched, sum(pred.values()), sum(ref.values())


def _scores(matched: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts; an empty prediction of an empty reference is perfect."""
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def word_scores(predicted: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, f1) of the predicted words against the reference words, as multisets."""
    return _scores(*_counts(predicted, reference))


def corpus_word_scores(pairs: Iterable[tuple[str, str]]) -> tuple[float, float, float]:
    """(precision, recall, f1) micro-averaged over (predicted, reference) page pairs.

    Matched, predicted and reference word counts are summed over all pages before dividing,
    so long pages weigh more than short ones.
    """
    matched = n_pred = n_ref = 0
    for predicted, reference in pairs:
        m, p, r = _counts(predicted, reference)
        matched += m
        n_pred += p
        n_ref += r
    return _scores(matched, n_pred, n_ref)
