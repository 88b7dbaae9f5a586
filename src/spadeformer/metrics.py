"""Text-generation metrics, from well-kept libraries (optional extra ``spadeformer[eval]``)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ROUGE_TYPES", "rouge"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F1 over the pairs, x100 (as summarisation papers
    report them), by Google's ``rouge-score`` with Porter stemming."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one; got "
                         f"{len(predictions)} and {len(references)}")
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError("ROUGE needs the rouge-score package: pip install "
                          "'spadeformer[eval]' (or: pip install rouge-score)") from err
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction) order
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
