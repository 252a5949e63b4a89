"""The non-neural baseline for sentiment: TF-IDF over character n-grams + logistic regression.

Character n-grams because the reviews are Chinese, written without spaces: a word
tokenizer would be a second model to trust; 1-3 character grams cover most words.
"""
from __future__ import annotations

import numpy as np


def tfidf_logreg_accuracy(train_texts: list[str], train_labels: np.ndarray,
                          test_texts: list[str], test_labels: np.ndarray,
                          ngram_max: int = 3, seed: int = 0) -> float:
    """Fits on the train reviews, returns accuracy on the test reviews."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, ngram_max), min_df=2, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=1000, random_state=seed))
    model.fit(train_texts, np.asarray(train_labels))
    return float(np.mean(model.predict(test_texts) == np.asarray(test_labels)))
