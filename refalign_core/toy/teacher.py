"""The toy teacher: a `ConvTokenVFM` trained on reference images of the world's *training* identities only.

An ImageNet backbone is trained to ignore colour, and colour is what the toy's identities differ in most, so RA
with EfficientNet-Lite0 can only pull the DiT toward features that barely tell the subjects apart. This teacher is
attribute-supervised: from the mean of its tokens and from every single token it predicts the subject's shape,
pattern and colour set (the judge's attributes), so each token knows the whole subject, as a VFM's tokens do. Its
inputs are what the feature cache gives a VFM: references fitted on white, then the training augmentation. It
never sees a held-out identity (each of which is a new combination of seen attributes), so retrieval on held-out
identities measures whether it generalises to new subjects."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inference.references import fit_on_white
from ..models.vfm import ConvTokenVFM
from ..training.data import ReferenceAugmentation
from .judge import HEADS, subject_labels
from .world import SIZE, Subject, all_subjects, reference_image


def reference_set(subjects: list[Subject], views: int, seed: int, size: int = SIZE
                  ) -> tuple[torch.Tensor, list[int]]:
    """`views` references per subject as the cache makes them (new angle and scale, fitted on white, augmented) ->
    (images `[S·views, 3, size, size]` in [0, 1], subject index of each)."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    augment = ReferenceAugmentation()
    images, owners = [], []
    for index, subject in enumerate(subjects):
        pairs = [reference_image(subject, rng, size) for _ in range(views)]
        fitted = torch.stack([fit_on_white(image, size, size, mask) for image, mask in pairs])
        images.append(augment(fitted, generator))
        owners += [index] * views
    return torch.cat(images), owners


class AttributeHeads(nn.Module):
    """Training-only heads over teacher tokens: shape, pattern, colour set."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, size) for name, size in HEADS.items()})

    def loss(self, features: torch.Tensor, shapes, patterns, colours) -> torch.Tensor:
        """features `[N, dim]` with labels `[N]`, `[N]`, `[N, 8]`."""
        return F.cross_entropy(self.heads["shape"](features), shapes) \
            + F.cross_entropy(self.heads["pattern"](features), patterns) \
            + F.binary_cross_entropy_with_logits(self.heads["colours"](features), colours)


def train_teacher(views: int = 16, steps: int = 1500, batch: int = 64, dim: int = 64, width: int = 32,
                  seed: int = 0, log=print) -> ConvTokenVFM:
    """Train on `views` augmented references of each training identity; the loss is the attribute loss on the
    token mean plus the same on every token (weight 0.5)."""
    torch.manual_seed(seed)
    training, _ = all_subjects()
    images, owners = reference_set(training, views, seed)
    labels = [subject_labels(s) for s in training]
    shapes = torch.tensor([labels[o][0] for o in owners])
    patterns = torch.tensor([labels[o][1] for o in owners])
    colours = torch.stack([labels[o][2] for o in owners])
    teacher, heads = ConvTokenVFM(dim, width).train(), AttributeHeads(dim)
    parameters = list(teacher.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=generator)
        tokens = teacher.encode(images[pick])  # [B, T, dim]
        per_token = tokens.shape[1]
        loss = heads.loss(tokens.mean(1), shapes[pick], patterns[pick], colours[pick]) + 0.5 * heads.loss(
            tokens.flatten(0, 1), shapes[pick].repeat_interleave(per_token),
            patterns[pick].repeat_interleave(per_token), colours[pick].repeat_interleave(per_token, 0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"teacher step {step}: loss {loss.item():.4f}")
    return teacher.eval().requires_grad_(False)


def subject_token_mask(images: torch.Tensor) -> torch.Tensor:
    """images `[N, 3, H, W]` on white -> `[N, (H/16)(W/16)]` bool: tokens whose 16×16 patch is over a quarter
    subject (pixels not near white)."""
    subject = (images.min(1).values < 0.9).float()
    return F.avg_pool2d(subject[:, None], 16).flatten(1) > 0.25


@torch.no_grad()
def pooled_tokens(vfm, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """A VFM's tokens averaged over each image's subject tokens: `[N, 3, H, W]` -> `[N, dim]`."""
    out = []
    for chunk in images.split(batch):
        tokens, mask = vfm(chunk), subject_token_mask(chunk)
        out.append(torch.stack([t[m].mean(0) for t, m in zip(tokens, mask)]))
    return torch.cat(out)


def retrieval_scores(embeddings: torch.Tensor) -> dict[str, list[float]]:
    """embeddings `[S, V, D]` (V views of S identities) -> per identity: retrieval accuracy (the nearest other view
    is the same identity), mean same-identity cosine and mean cross-identity cosine, on embeddings centred on their
    mean (what every view shares, e.g. a residual stream's constant part, says nothing about identity)."""
    s, v, _ = embeddings.shape
    flat = embeddings.flatten(0, 1).float()
    flat = F.normalize(flat - flat.mean(0), dim=-1)
    cos = flat @ flat.T
    labels = torch.arange(s).repeat_interleave(v)
    cos.fill_diagonal_(-2)
    hit = (labels[cos.argmax(1)] == labels).float().view(s, v).mean(1)
    same = labels[:, None] == labels[None, :]
    cos.fill_diagonal_(float("nan"))
    same_cos = torch.stack([cos[i][same[i]].nanmean() for i in range(len(labels))]).view(s, v).mean(1)
    cross_cos = torch.stack([cos[i][~same[i]].mean() for i in range(len(labels))]).view(s, v).mean(1)
    return {"retrieval": hit.tolist(), "same": same_cos.tolist(), "cross": cross_cos.tolist()}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 steps: int = 300) -> float:
    """Accuracy on the test set of a linear probe fitted on standardised training features: softmax regression for
    class indices `[N]`, or one logistic regression per label for multi-hot labels `[N, C]` (right = every label
    right)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    multi_label = train_y.ndim == 2
    probe = nn.Linear(train_x.shape[1], train_y.shape[1] if multi_label else int(train_y.max()) + 1)
    loss_fn = F.binary_cross_entropy_with_logits if multi_label else F.cross_entropy
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = loss_fn(probe(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = probe(test_x)
        right = ((logits > 0) == (test_y > 0.5)).all(1) if multi_label else logits.argmax(1) == test_y
        return float(right.float().mean())


def teacher_report(vfm, views: int = 6, seed: int = 1) -> dict:
    """What a teacher knows of subjects it never saw: nearest-neighbour retrieval among `views` augmented
    references of each held-out identity (mean over identities), and linear probes for the colour set (body and
    accent, as the judge scores it) and the pattern, fitted on references of training identities (4 views each),
    tested on the held-out ones."""
    training, held_out = all_subjects()
    test_images, test_owners = reference_set(held_out, views, seed)
    test = pooled_tokens(vfm, test_images)
    train_images, owners = reference_set(training, 4, seed + 1)
    train = pooled_tokens(vfm, train_images)
    report = {"retrieval": float(np.mean(retrieval_scores(test.view(len(held_out), views, -1))["retrieval"]))}
    for attribute, label in (("colours", lambda s: subject_labels(s)[2]),
                             ("pattern", lambda s: torch.tensor(subject_labels(s)[1]))):
        y_train = torch.stack([label(training[o]) for o in owners])
        y_test = torch.stack([label(held_out[o]) for o in test_owners])
        report[f"probe_{attribute}"] = linear_probe(train, y_train, test, y_test)
    return report
