"""Classifier-based checks on PCA embeddings: can real be told from generated, and do generated cells teach
a cell-type classifier that transfers to held-out real cells?"""

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def real_vs_generated_auroc(real: np.ndarray, generated: np.ndarray, n_folds: int = 5, seed: int = 0) -> float:
    """Cross-validated AUROC of a random forest separating real `[N, D]` from generated `[M, D]`: 0.5 ideal, 1 worst."""
    features = np.concatenate([real, generated])
    is_generated = np.repeat([0, 1], [len(real), len(generated)])
    classifier = RandomForestClassifier(n_estimators=50, min_samples_leaf=3, random_state=seed)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, features, is_generated, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(is_generated, scores))


def cell_type_f1(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, seed: int = 0
) -> float:
    """Macro F1 over the test cell types of a logistic regression trained on `train [N, D]`, tested on `test [M, D]`."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    predictions = classifier.fit(train, train_labels).predict(test)
    return float(f1_score(test_labels, predictions, labels=np.unique(test_labels), average="macro", zero_division=0))
