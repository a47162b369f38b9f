"""LFW's pairs files and its 10-fold protocol, against hand-made files and a direct computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpa.contract.errors import UserError
from dpa.faces.lfw_protocol import best_threshold, image_path, read_pairs, ten_fold_accuracy
from tests.conftest import LFW, needs_lfw


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_view2_layout_is_parsed_fold_by_fold(tmp_path: Path) -> None:
    p = _write(tmp_path / "pairs.txt", ["2\t1", "Ann\t1\t2", "Ann\t1\tBob\t3", "Cy\t2\t4", "Bob\t1\tCy\t1"])
    pairs = read_pairs(p)
    assert pairs.first == (("Ann", 1), ("Ann", 1), ("Cy", 2), ("Bob", 1))
    assert pairs.second == (("Ann", 2), ("Bob", 3), ("Cy", 4), ("Cy", 1))
    assert pairs.same.tolist() == [True, False, True, False] and pairs.fold.tolist() == [0, 0, 1, 1]
    assert image_path(Path("/x"), ("Ann", 2)) == Path("/x/Ann/Ann_0002.jpg")


def test_bad_files_are_refused_with_the_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="promises 2 x 2 x 1 pairs, the file has 3"):
        read_pairs(_write(tmp_path / "a.txt", ["2\t1", "Ann\t1\t2", "Ann\t1\tBob\t3", "Cy\t2\t4"]))
    with pytest.raises(UserError, match=r"a.txt:3: expected a mismatched pair"):
        read_pairs(_write(tmp_path / "a.txt", ["1\t1", "Ann\t1\t2", "Ann\t1\t3"]))
    with pytest.raises(UserError, match="is not an image number"):
        read_pairs(_write(tmp_path / "a.txt", ["1\t1", "Ann\t1\tx", "Ann\t1\tBob\t3"]))


def test_ten_folds_choose_each_threshold_on_the_other_nine() -> None:
    """Against a direct computation: brute force over every candidate threshold of the other folds."""
    rng = np.random.default_rng(0)
    same = np.tile(np.repeat([True, False], 30), 10)
    fold = np.repeat(np.arange(10), 60)
    scores = np.where(same, rng.normal(0.6, 0.2, 600), rng.normal(0.2, 0.2, 600))
    from dpa.faces.lfw_protocol import LfwPairs

    pairs = LfwPairs((("a", 1),) * 600, (("b", 1),) * 600, same, fold)
    result = ten_fold_accuracy(scores, pairs)
    expected = []
    for k in range(10):
        train = fold != k
        cands = np.sort(scores[train])
        accs = [np.mean((scores[train] >= t) == same[train]) for t in cands]
        t = cands[int(np.argmax(accs))]
        expected.append(np.mean((scores[~train] >= t) == same[~train]))
    # the product's threshold is the midpoint below the best candidate: the same split of the training folds
    np.testing.assert_allclose(result["fold_accuracies"], expected, atol=1 / 60 + 1e-12)
    assert abs(result["accuracy"] - np.mean(expected)) <= 0.005
    assert result["std"] == pytest.approx(np.std(result["fold_accuracies"], ddof=1))


def test_best_threshold_separates_separable_scores() -> None:
    t = best_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True]))
    assert 0.2 < t < 0.8


@needs_lfw
def test_the_official_files_parse() -> None:
    view2 = read_pairs(LFW / "pairs.txt")
    assert len(view2.same) == 6000 and view2.folds == 10 and view2.same.sum() == 3000
    dev = read_pairs(LFW / "pairsDevTrain.txt")
    assert len(dev.same) == 2200 and dev.folds == 1
    assert len(view2.images()) == 7701
