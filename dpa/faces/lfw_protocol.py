"""LFW's verification protocol: its pairs files and the 10-fold accuracy the field reports.

View 2 (``pairs.txt``) is 10 folds of 300 same-person and 300 different-person pairs; the figure is the
mean accuracy over the folds, each fold's threshold chosen on the other nine ("unrestricted, labeled
outside data" when the network was trained elsewhere, as dlib's was). View 1 (``pairsDevTrain.txt``,
``pairsDevTest.txt``) is for development: choices are made there, never on View 2. Format: LFW's README,
section "Pairs". Pure: parsing text and arithmetic on scores; no images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpa.contract.errors import UserError

__all__ = ["LfwPairs", "read_pairs", "image_path", "ten_fold_accuracy", "best_threshold"]


@dataclass(frozen=True)
class LfwPairs:
    """The pairs of one LFW pairs file: image keys ``(name, number)`` and the fold of each pair."""

    first: tuple[tuple[str, int], ...]
    second: tuple[tuple[str, int], ...]
    same: np.ndarray  # (P,) bool
    fold: np.ndarray  # (P,) int: 0..9 for View 2, 0 for a View 1 file

    @property
    def folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self.fold) else 0

    def images(self) -> list[tuple[str, int]]:
        """Every image the pairs name, once, sorted."""
        return sorted(set(self.first) | set(self.second))


def _key(name: str, number: str, path: Path, line: int) -> tuple[str, int]:
    try:
        return name, int(number)
    except ValueError:
        raise UserError(f"{path}:{line}: {number!r} is not an image number") from None


def read_pairs(path: Path) -> LfwPairs:
    """Parse ``pairs.txt`` (first line: folds and pairs per half-fold) or a View 1 file (first line: pairs
    per half); matched lines ``name n1 n2``, mismatched ``name1 n1 name2 n2``. Raises UserError naming the
    line that does not fit."""
    try:
        lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise UserError(f"cannot read pairs file {path}: {exc.strerror}") from None
    if not lines:
        raise UserError(f"pairs file {path} is empty")
    head = lines[0]
    folds, per = (int(head[0]), int(head[1])) if len(head) == 2 else (1, int(head[0]))
    if len(lines) - 1 != 2 * folds * per:
        raise UserError(f"{path}: the header promises {folds} x 2 x {per} pairs, the file has {len(lines) - 1}")
    first, second, same, fold = [], [], [], []
    for i, parts in enumerate(lines[1:]):
        k, within = divmod(i, 2 * per)
        matched = within < per
        n = i + 2
        if matched and len(parts) == 3:
            first.append(_key(parts[0], parts[1], path, n))
            second.append(_key(parts[0], parts[2], path, n))
        elif not matched and len(parts) == 4:
            first.append(_key(parts[0], parts[1], path, n))
            second.append(_key(parts[2], parts[3], path, n))
        else:
            raise UserError(f"{path}:{n}: expected a {'matched' if matched else 'mismatched'} pair, got {parts}")
        same.append(matched)
        fold.append(k)
    return LfwPairs(tuple(first), tuple(second), np.array(same, bool), np.array(fold, np.int64))


def image_path(root: Path, key: tuple[str, int], suffix: str = ".jpg") -> Path:
    """``root/Name/Name_0001.jpg``: where LFW keeps image ``number`` of ``name``."""
    name, number = key
    return Path(root) / name / f"{name}_{number:04d}{suffix}"


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold with the highest accuracy of "same iff score >= t" on these pairs: the midpoint between
    two adjacent sorted scores (ties broken toward the lower candidate, so the choice is deterministic)."""
    s = np.sort(np.unique(np.asarray(scores, dtype=np.float64)))
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    y = np.asarray(same, bool)
    accept = np.asarray(scores)[None, :] >= candidates[:, None]
    acc = (accept[:, y].sum(1) + (~accept[:, ~y]).sum(1)) / len(y)
    return float(candidates[int(np.argmax(acc))])


def ten_fold_accuracy(scores: np.ndarray, pairs: LfwPairs) -> dict[str, float | list[float]]:
    """LFW's figure: for each fold, the threshold chosen on the other folds, the accuracy on this one. Returns
    the mean, the standard deviation over folds (ddof 1) and the standard error LFW's results page quotes
    (std / sqrt(folds)), with each fold's accuracy and threshold."""
    if pairs.folds < 2:
        raise UserError("the 10-fold protocol needs View 2's pairs.txt (this file has one fold)")
    s = np.asarray(scores, dtype=np.float64)
    accs, thresholds = [], []
    for k in range(pairs.folds):
        test = pairs.fold == k
        t = best_threshold(s[~test], pairs.same[~test])
        accs.append(float(np.mean((s[test] >= t) == pairs.same[test])))
        thresholds.append(t)
    a = np.array(accs)
    return {
        "accuracy": float(a.mean()),
        "std": float(a.std(ddof=1)),
        "standard_error": float(a.std(ddof=1) / np.sqrt(len(a))),
        "fold_accuracies": accs,
        "fold_thresholds": thresholds,
    }
