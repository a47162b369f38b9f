"""``dpa attack labels``: the server's best guess of each training example's identity.

The attacker is the edge server with everything it saw, in the strongest setting we can justify:
it can tell which releases belong to the same example across epochs (it cannot, in the protocol;
assuming it can only makes the attack stronger). From a recorded view (``--record-view``, every
training release) and its own trained tail it forms two guesses per training example:

* **labels alone**: the class received most often (randomised response's maximum-likelihood guess
  when the prior is uniform; ties go to the lowest class);
* **everything**: the maximum a posteriori class given the received labels (k-ary randomised response
  likelihoods at the session's label epsilon) and its tail's softmax on every release of the example.

Each accuracy is reported next to the bound its epsilon implies: no guess of a label drawn uniformly
among k classes from an (eps, delta)-DP release beats (e^eps + (k - 1) delta) / (e^eps + k - 1)
(``label_accounting.label_guess_bound``), with eps the labels' whole-run epsilon for the first and the
combined whole-run epsilon (activations and labels) for the second.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpa.audit.victim import TrainedSplitModel
from dpa.contract.errors import UserError
from dpa.contract.server_view import load_view
from dpa.privacy.label_accounting import combined_epsilon, label_epsilon_spent, label_guess_bound
from dpa.privacy.label_randomizer import keep_probability

__all__ = ["LabelAttackReport", "attack_labels"]


@dataclass(frozen=True)
class LabelAttackReport:
    examples: int
    classes: int
    releases_per_example: float
    label_epsilon_per_release: float
    label_epsilon_total: float  # pure label-DP of the labels alone (delta 0)
    combined_epsilon: float  # activations and labels, at delta
    delta: float
    accuracy_labels_only: float
    bound_labels_only: float
    accuracy_everything: float
    bound_everything: float
    chance: float

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        return {
            "attack": "server's MAP guess of each training example's identity (releases linked across epochs)",
            **{k: num(v) if isinstance(v, float) else v for k, v in self.__dict__.items()},
        }


def attack_labels(
    view_dir: Path, artifacts: Path, server_state: Path, *, classes: int | None = None
) -> LabelAttackReport:
    """Both guesses for every training example in the view, scored against truth.json's labels."""
    view = load_view(view_dir)
    train = [i for i, r in enumerate(view.releases) if r.get("kind", "train") == "train"]
    if not train:
        raise UserError(f"{view_dir} records no training release")
    model = TrainedSplitModel(artifacts, tail_checkpoint=server_state)
    k_out = model.manifest.num_classes
    received: dict[str, list[int]] = defaultdict(list)
    log_tail: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(k_out))
    truth: dict[str, int] = {}
    eps_label = float(view.releases[train[0]].get("label_epsilon", math.inf))
    for i in train:
        activation, sent = view.arrays(i)
        sources, labels = view.sources(i), view.true_labels(i)
        if sources is None or labels is None:
            raise UserError(f"{view_dir} has no true labels for {view.releases[i]['file']}: nothing to score")
        if float(view.releases[i].get("label_epsilon", math.inf)) != eps_label:
            raise UserError(f"{view_dir}: releases with different label epsilons")
        logits = model.tail_logits(activation.astype(np.float32)).astype(np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        for src, y_sent, y_true, lp in zip(sources, sent, labels, logp, strict=True):
            received[src].append(int(y_sent))
            log_tail[src] += lp
            truth[src] = int(y_true)
    k = classes if classes is not None else len(set(truth.values()))
    keep = keep_probability(eps_label, k_out)
    log_keep = math.log(keep) if keep > 0 else -math.inf
    log_other = math.log((1 - keep) / (k_out - 1)) if keep < 1 else -1e30  # in clear: a received label is the label
    right_labels = right_all = 0
    for src, got in received.items():
        counts = np.bincount(got, minlength=k_out)
        right_labels += int(np.argmax(counts) == truth[src])
        posterior = counts * log_keep + (len(got) - counts) * log_other + log_tail[src]
        right_all += int(np.argmax(posterior) == truth[src])
    n = len(received)
    r0 = view.releases[train[0]]
    delta = float(r0["delta"])
    releases = max(len(v) for v in received.values())
    z = float(r0["noise_multiplier"])
    eps_labels_total = label_epsilon_spent(label_epsilon=eps_label, releases=releases)
    eps_all = combined_epsilon(
        mechanism=r0["mechanism"], noise_multiplier=z, label_epsilon=eps_label, releases=releases, delta=delta
    )
    return LabelAttackReport(
        examples=n,
        classes=k,
        releases_per_example=sum(len(v) for v in received.values()) / n,
        label_epsilon_per_release=eps_label,
        label_epsilon_total=eps_labels_total,
        combined_epsilon=eps_all,
        delta=delta,
        accuracy_labels_only=right_labels / n,
        bound_labels_only=label_guess_bound(epsilon=eps_labels_total, delta=0.0, classes=k),
        accuracy_everything=right_all / n,
        bound_everything=label_guess_bound(epsilon=eps_all, delta=delta, classes=k),
        chance=1 / k,
    )
