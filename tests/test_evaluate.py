"""kNN vote rule of METHOD.md section 6 on hand-computed cases."""
import numpy as np

from microsnoop_ray.evaluate import knn_accuracy, knn_predict


def test_majority_ties_to_smallest_label_and_distinct_votes_to_nearest():
    # point 0 at x=0; neighbours at 1 (label 2), 2 (label 1), 3 (label 2), 4 (label 1)
    X = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    y = np.array([0, 2, 1, 2, 1])
    assert knn_predict(X, y, k=4)[0] == 1  # 2 votes each for labels 1 and 2 -> smallest label
    assert knn_predict(X, y, k=3)[0] == 2  # labels 2, 1, 2 -> majority 2
    y2 = np.array([0, 5, 3, 4, 1])
    assert knn_predict(X, y2, k=3)[0] == 5  # 5, 3, 4 all distinct -> the nearest one's label
    assert knn_predict(X, y2, k=1)[0] == 5


def test_accuracy_per_class_and_f1():
    X = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [0.15]])
    y = np.array([0, 0, 0, 1, 1, 1])
    # 1-NN by hand: 0->0.1 (0), 0.1->0.15 (1), 0.2->0.15 (1), 5->5.1 (1), 5.1->5 (1),
    # 0.15->0.1 (0; tie with 0.2 goes to the earlier index)
    assert knn_predict(X, y, k=1).tolist() == [0, 1, 1, 1, 1, 0]
    r = knn_accuracy(X, y, k=1)
    assert r["accuracy"] == 0.5
    assert r["per_class"] == {"0": 1 / 3, "1": 2 / 3}
    f1_0 = 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)
    f1_1 = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert abs(r["macro_f1"] - (f1_0 + f1_1) / 2) < 1e-12
