"""Linear heads on a backbone's features: feature extraction, evaluation, and the head
fits (a closed-form linear discriminant from class statistics that add up over clients,
and an L2 logistic regression).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .engine import Plan, dense_plan
from .model import FedViT


@torch.no_grad()
def extract_features(model: FedViT, data: ImageSet, task: str, batch_size: int = 256, plan: Plan | None = None, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (eval mode) and labels: of the dense model (every block, every
    token) or, given `plan`, with its tokens dropped or skipped. `autocast` runs the
    matmuls in bfloat16 (fast on CPUs with AMX); the features come back in float32."""
    was_training = model.training
    model.eval()
    plan = dense_plan(model) if plan is None else plan
    feats, labels = [], []
    for images, y in data.loader(batch_size, shuffle=False, task=task):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            out, _ = model.forward_features(images, plan, task)
        feats.append(out.float())
        labels.append(y)
    model.train(was_training)
    if not feats:  # no image of the task (a multidomain client without data of one of its tasks): no features, no statistics
        width = model.heads[task].in_features
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def fit_linear_head(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, reg: float, max_iter: int = 200) -> float:
    """Multinomial logistic regression into `head` by L-BFGS, warm-started from its weights.

    Minimises mean cross-entropy + reg/2 * |W|^2 (the bias is not penalised; strictly
    convex for reg > 0, so the start only changes the steps taken). Returns the final loss.
    """
    feats, labels = feats.detach().to(head.weight.device), labels.to(head.weight.device)
    w = head.weight.detach().clone().float().requires_grad_(True)
    b = head.bias.detach().clone().float().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(feats @ w.T + b, labels) + 0.5 * reg * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        loss = opt.step(closure)
    set_head(head, w, b)
    return float(loss.detach())


@torch.no_grad()
def set_head(head: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a fitted weight and bias into `head` (in place: optimizers keep their references)."""
    head.weight.copy_(weight)
    head.bias.copy_(bias)


def split_stats(flat: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Statistics as they travel and are saved, {"TASK.PART": array}, per task: {TASK: {PART: array}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        task, _, part = key.rpartition(".")
        out.setdefault(task, {})[part] = value
    return out


def join_stats(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The inverse of `split_stats`."""
    return {f"{task}.{part}": value for task, parts in stats.items() for part, value in parts.items()}


@torch.no_grad()
def class_stats(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """Sufficient statistics of features per class, in float64: counts [C], sums [C, d] and the
    total second moment X^T X [d, d]. They add up over clients to those of the pooled data."""
    x = feats.double()
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    return {"count": torch.bincount(labels, minlength=num_classes).double().numpy(), "sum": sums.numpy(), "outer": (x.T @ x).numpy()}


def bound_contribution(feats: torch.Tensor, labels: torch.Tensor, clip: float, max_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What one client may put into differentially private statistics: at most `max_examples`
    examples (a seeded sample) with each feature vector scaled down to L2 norm `clip`. Then
    its counts have L2 norm at most max_examples, its sums max_examples * clip and its second
    moment (Frobenius) max_examples * clip^2: the sensitivities privatize_stats adds noise for."""
    if len(feats) > max_examples:
        keep = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:max_examples]
        feats, labels = feats[keep], labels[keep]
    norms = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return feats * (clip / norms).clamp(max=1.0), labels


def project_contribution(stats: dict[str, np.ndarray], clip: float, max_examples: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """One client's `class_stats` held to the bounds that bound_contribution gives an honest
    client (counts summing to at most max_examples, sums of L2 norm at most max_examples * clip,
    a second moment of Frobenius norm at most max_examples * clip^2), each part scaled down onto
    its bound where it exceeds it: privatize_stats' sensitivities then hold whatever a client
    sends. Returns the statistics and the parts that exceeded their bound by more than rounding."""
    n = float(max_examples)
    limits = {"count": n, "sum": n * clip, "outer": n * clip**2}
    out, scaled = {}, []
    for part, value in stats.items():
        size = float(value.sum()) if part == "count" else float(np.linalg.norm(value))
        limit = limits.get(part)
        out[part] = value * (limit / size) if limit is not None and size > limit else value
        if limit is not None and size > limit * (1 + 1e-5):  # not float32 rounding of clipped features
            scaled.append(f"{part} ({size:.4g} > {limit:.4g})")
    return out, scaled


def privatize_stats(stats: dict[str, np.ndarray], noise_multiplier: float, clip: float, max_examples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on summed `class_stats` whose clients bounded their contribution
    (bound_contribution): noise of `noise_multiplier` times each part's sensitivity (three
    Gaussian mechanisms, accounted as such), the second moment's noise symmetric. Counts stay
    at least 1, so every class the noise leaves keeps a mean."""
    z, n = noise_multiplier, float(max_examples)
    count = stats["count"] + rng.normal(0.0, z * n, size=stats["count"].shape)
    sums = stats["sum"] + rng.normal(0.0, z * n * clip, size=stats["sum"].shape)
    noise = rng.normal(0.0, z * n * clip**2, size=stats["outer"].shape)
    outer = stats["outer"] + np.triu(noise) + np.triu(noise, 1).T
    return {"count": np.maximum(count, 1.0), "sum": sums, "outer": outer}


def nearest_psd(cov: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """`cov` with its eigenvalues raised to at least `floor` times their mean absolute value
    (noise can make a summed covariance indefinite)."""
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    vals = np.maximum(vals, floor * max(np.abs(vals).mean(), 1e-12))
    return (vecs * vals) @ vecs.T


class StatsSum:
    """Per-task `class_stats` summed over clients (what the server's head fit reads).

    `add` takes one client's statistics; a task whose parts are missing, non-finite or
    negative, or whose shapes disagree with the others', is left out and its reason returned.
    """

    PARTS = frozenset({"count", "sum", "outer"})

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, np.ndarray]] = {}
        self.nbytes = 0  # of the statistics taken in

    def add(self, stats: dict[str, dict[str, np.ndarray]], head_shapes: dict[str, tuple[int, int]] | None = None) -> list[str]:
        """Add one client's statistics; the problems of the tasks left out. `head_shapes`: the
        model's (classes, features) per task, which the statistics must match (None: only
        consistency with the earlier contributions is checked)."""
        problems = []
        for task, parts in stats.items():
            problem = self._problem(task, parts)
            if problem is None and head_shapes is not None:
                if task not in head_shapes:
                    problem = f"task {task!r} is not one of the model's ({', '.join(sorted(head_shapes))})"
                elif parts["sum"].shape != head_shapes[task]:
                    problem = f"task {task!r} statistics are for {parts['sum'].shape} (classes, features), the model's head is {head_shapes[task]}"
            if problem:
                problems.append(problem)
                continue
            have = self.tasks.setdefault(task, {k: np.zeros_like(v, dtype=np.float64) for k, v in parts.items()})
            for k, v in parts.items():
                have[k] += v
            self.nbytes += int(sum(v.nbytes for v in parts.values()))
        return problems

    def _problem(self, task: str, parts: dict[str, np.ndarray]) -> str | None:
        if set(parts) != self.PARTS:
            return f"task {task!r} has parts {sorted(parts)}, expected count, sum, outer"
        if not all(np.isfinite(v).all() for v in parts.values()) or (parts["count"] < 0).any():
            return f"task {task!r} has non-finite or negative statistics"
        c, d = parts["sum"].shape if parts["sum"].ndim == 2 else (-1, -1)
        have = self.tasks.get(task)
        if parts["count"].shape != (c,) or parts["outer"].shape != (d, d) or (have and have["sum"].shape != (c, d)):
            return f"task {task!r} statistics have inconsistent shapes"
        return None


def lda_head(stats: dict[str, np.ndarray], shrink: float = 1e-4, priors: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant analysis from `class_stats` (or their sum over clients): class
    means, a pooled within-class covariance (shrunk by `shrink` toward its mean variance, so
    it is invertible) and class priors (the statistics' class shares, or `priors`) give a
    linear head W x + b. Classes with no example get a bias no logit reaches."""
    count, means, cov = class_moments(stats)
    present = count > 0
    if present.sum() < 2:
        raise ValueError(f"a discriminant head needs examples of at least 2 classes, got {int(present.sum())}")
    shares = np.where(present, count, 1.0) / count.sum() if priors is None else np.asarray(priors, dtype=np.float64)
    return discriminant(means, cov, shares, present, shrink)


def class_moments(stats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From `class_stats`: the counts [C], the class means [C, d] (zero for absent classes) and
    the pooled within-class covariance [d, d]."""
    count, sums, outer = np.asarray(stats["count"], dtype=np.float64), np.asarray(stats["sum"], dtype=np.float64), np.asarray(stats["outer"], dtype=np.float64)
    present = count > 0
    means = np.zeros_like(sums)
    means[present] = sums[present] / count[present, None]
    within = outer - (means[present].T * count[present]) @ means[present]
    return count, means, within / max(count.sum() - present.sum(), 1.0)


def own_covariance_shrink(n: float, d: int) -> float:
    """How far a client's own within-class covariance (n examples, d features; n < d is common)
    is shrunk towards its mean variance when it has no better one: d / (n + d)."""
    return d / (n + d)


ABSENT_CLASS_BIAS = -1e15  # below any logit a present class reaches; its square (a proximal term, an L2 norm) stays finite in float32


def discriminant(means: np.ndarray, cov: np.ndarray, priors: np.ndarray, present: np.ndarray, shrink: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head of Gaussian classes with one covariance (shrunk by `shrink` toward its
    mean variance): W = means cov^-1, b = -means cov^-1 means / 2 + log priors; classes not
    `present` get a bias no logit reaches."""
    # the mean variance, floored relative to the class means' size: a covariance of zero (one
    # example per class, or features that never vary) would give logits of 1e15 and more, as
    # low as an absent class's bias
    scale = max(np.trace(cov) / len(cov), 1e-6 * float((means**2).sum(1).mean()) / len(cov), 1e-12)
    cov = (1 - shrink) * cov + max(shrink, 1e-12) * scale * np.eye(len(cov))
    prec_means = np.linalg.solve(cov, means.T).T  # [C, d]
    bias = -0.5 * (means * prec_means).sum(1) + np.log(np.where(present, priors, 1.0))
    # what every present class shares (a row, a bias) cancels between their logits: taken out in
    # float64, the float32 head keeps the differences (features with a common offset and a poorly
    # conditioned covariance give rows and biases of 1e7-1e9 whose difference is what decides)
    prec_means[present] -= prec_means[present].mean(0)
    bias[present] -= bias[present].mean()
    prec_means[~present] = 0.0  # an absent class's logit is its bias alone, whatever the features' scale
    bias[~present] = ABSENT_CLASS_BIAS
    return torch.from_numpy(prec_means).float(), torch.from_numpy(bias).float()


@torch.no_grad()
def evaluate(model: FedViT, data: ImageSet, task: str | None = None, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and loss of the dense model (every block, every token) on `data`: the task's
    head on `extract_features` (the one evaluation path)."""
    task = model.check_task(task)
    feats, labels = extract_features(model, data, task, batch_size)
    correct, loss = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = model.forward_head(feats[start : start + batch_size], task)
        y = labels[start : start + batch_size]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    total = len(labels)
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1), "num_examples": total}


def personal_lda_head(own: dict[str, np.ndarray], fed: dict[str, np.ndarray] | None, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's discriminant head in closed form, from its class statistics on the global
    model's features and the federation's (`fed`, summed over clients):

    - the covariance is the federation's pooled within-class covariance (estimated from every
      client's data; a client's own few hundred examples estimate a d x d matrix poorly), the
      client's own, shrunk by d / (n + d) towards its mean variance, when no federation
      statistics have arrived yet (a run's first evaluation);
    - each class mean is the client's own, pulled towards the federation's by `shrink`
      pseudo-examples (so a class the client has one or two examples of leans on the
      federation);
    - the priors are the client's own class shares; a class the client has no example of is
      left out (its prior is 0), as its local data say it does not occur there. A client that
      meets new classes should use the global model.
    """
    count, means, cov = class_moments(own)
    present = count > 0
    cov_shrink = 1e-4
    if fed is not None and float(np.sum(fed["count"])) > 0:
        fed_count, fed_means, fed_cov = class_moments(fed)
        cov = fed_cov
        pull = np.where(fed_count > 0, shrink, 0.0)[:, None]  # a class the federation's statistics lack has no mean to pull towards
        means = (count[:, None] * means + pull * fed_means) / np.maximum(count[:, None] + pull, 1e-12)
    else:
        # the client's own covariance: n examples estimate d x d poorly (n < d is common), so it
        # is shrunk towards its mean variance by d / (n + d) (on the starting model's features,
        # Fashion-MNIST, 20 clients: +1.0 to +7.0 points over a token shrinkage)
        cov_shrink = own_covariance_shrink(float(count.sum()), cov.shape[0])
    if present.sum() < 2:
        return single_class_head(present, means.shape[1])
    return discriminant(means, cov, count / count.sum(), present, cov_shrink)


def single_class_head(present: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head of data with one class (a discriminant needs two): that class is the prediction,
    every other gets a bias no logit reaches."""
    return torch.zeros((len(present), dim), dtype=torch.float32), torch.from_numpy(np.where(present, 0.0, ABSENT_CLASS_BIAS)).float()
