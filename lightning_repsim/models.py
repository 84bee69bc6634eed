"""The paper's model architectures (SPEC §1, §7), reusable with Lightning and :class:`ReferenceComparison`.

Every model here is in the paper's family ``p(y|x) = softmax_y(f(x)^T g(y))``:

* :class:`TwoTower` holds an embedding network ``f`` (inputs -> R^M) and an unembedding network ``g``
  (the (K-1)-dim one-hot of a label, last class = zero vector -> R^M), as in the authors' experiments.
  Its logits are ``f(x) G^T`` with ``G = unembed()`` (K x M). There is no final ``nn.Linear`` that
  produces the logits, so the callback's default extractor cannot find the representations: pass
  :class:`EmbedUnembed` as ``reference_extractor`` / ``student_extractor``.
* :class:`BottleneckClassifier` is an ordinary classifier with an M-dim bottleneck followed by a final
  ``nn.Linear(M, K)``; the callback's default extractor (``FinalLinear``) handles it (f = bottleneck,
  g = the weight rows, the bias as an extra coordinate).

Builders: :func:`radial_model` (Section 5.2), :func:`cifar_resnet18` and :func:`cifar_model`
(Section 5.1). :class:`Classifier` is the LightningModule that trains any of them with cross-entropy
and Adam (lr 1e-4 by default, the paper's setting).

Example:
    >>> import torch
    >>> from lightning_repsim.callbacks import ReferenceComparison
    >>> ref, stu = Classifier(radial_model(4, 16)), Classifier(radial_model(4, 16))
    >>> reps = EmbedUnembed()(stu, torch.randn(5, 2))
    >>> reps.logits.shape, reps.embeddings.shape, reps.unembedding.shape
    (torch.Size([5, 4]), torch.Size([5, 2]), torch.Size([4, 2]))
    >>> cb = ReferenceComparison(ref, reference_extractor=EmbedUnembed(), student_extractor=EmbedUnembed())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MLP",
    "TwoTower",
    "BottleneckClassifier",
    "Classifier",
    "EmbedUnembed",
    "label_one_hot",
    "logits_from",
    "radial_model",
    "cifar_resnet18",
    "cifar_model",
]


def label_one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """The (K-1)-dim one-hot code of the paper's unembedding networks: class K-1 is the zero vector.

    Example:
        >>> label_one_hot(torch.arange(3), 3)
        tensor([[1., 0.],
                [0., 1.],
                [0., 0.]])
    """
    return F.one_hot(labels.long(), num_classes).to(torch.get_default_dtype())[:, :-1]


class MLP(nn.Sequential):
    """``depth`` hidden layers of width ``width`` with LeakyReLU, then a bias-free linear layer to ``out_dim``
    (the authors' ``SmallMLP``: the last layer has no bias).

    Example:
        >>> MLP(2, 16, 2)(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """

    def __init__(self, in_dim: int, width: int, out_dim: int, depth: int = 3) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LeakyReLU()]
            d = width
        layers.append(nn.Linear(d, out_dim, bias=False))
        super().__init__(*layers)


class TwoTower(nn.Module):
    """``p(y|x) = softmax_y(f(x)^T g(y))`` with an embedding network ``f`` and an unembedding network ``g``
    evaluated on :func:`label_one_hot` codes.

    Args:
        embedding: ``f``, maps a batch of inputs to ``(B, M)``.
        unembedding: ``g``, maps ``(K, K-1)`` one-hot codes to ``(K, M)``.
        num_classes: K.
    """

    def __init__(self, embedding: nn.Module, unembedding: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.f = embedding
        self.g = unembedding
        self.num_classes = int(num_classes)
        self.register_buffer("codes", label_one_hot(torch.arange(self.num_classes), self.num_classes), persistent=False)

    def embed(self, x: Tensor) -> Tensor:
        """f(x): ``(B, M)``."""
        return self.f(x)

    def unembed(self) -> Tensor:
        """G = [g(y)]_y: ``(K, M)``."""
        return self.g(self.codes.to(next(self.g.parameters()).dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x) @ self.unembed().T


class BottleneckClassifier(nn.Module):
    """An MLP with an M-dim bottleneck and a final ``nn.Linear(M, K)`` (the callback's default extractor
    finds it): ``inputs -> hidden (ReLU) -> M -> K``.

    Example:
        >>> BottleneckClassifier(64, 10, hidden=(32,), rep_dim=2)(torch.randn(3, 64)).shape
        torch.Size([3, 10])
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (256, 256), rep_dim: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, rep_dim))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(rep_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x.flatten(1))

    def unembed(self) -> Tensor:
        """``[W, b]`` of the head: ``(K, M+1)``, the bias as last column."""
        return torch.cat([self.head.weight, self.head.bias[:, None]], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def radial_model(num_classes: int, width: int, rep_dim: int = 2) -> TwoTower:
    """Section 5.2: f = MLP(2 -> W, W, W -> M), g = MLP(K-1 -> W, W, W -> M), LeakyReLU, last layers bias-free."""
    return TwoTower(MLP(2, width, rep_dim), MLP(num_classes - 1, width, rep_dim), num_classes)


def cifar_resnet18(rep_dim: int = 2) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) ending in ``Linear(512, rep_dim)``.

    Built from ``torchvision.models.resnet18(weights=None)`` (nothing is downloaded).

    Example:
        >>> cifar_resnet18()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 2])
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=rep_dim)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def cifar_model(num_classes: int = 10, rep_dim: int = 2, unembedding_width: int = 128) -> TwoTower:
    """Section 5.1: f = :func:`cifar_resnet18`, g = MLP of three 128-wide LeakyReLU layers on the 9-dim one-hot."""
    return TwoTower(cifar_resnet18(rep_dim), MLP(num_classes - 1, unembedding_width, rep_dim), num_classes)


def logits_from(emb: Tensor, unemb: Tensor) -> Tensor:
    """Logits ``f(x) W^T (+ b)`` from embeddings ``(B, M)`` and an unembedding ``(K, M)`` or ``(K, M+1)`` (bias last)."""
    logits = emb @ unemb[:, : emb.shape[-1]].T
    if unemb.shape[-1] == emb.shape[-1] + 1:
        logits = logits + unemb[:, -1]
    return logits


class EmbedUnembed:
    """Extractor for :class:`ReferenceComparison` from a model's ``embed(x)`` and ``unembed()`` methods.

    Works with :class:`TwoTower`, :class:`BottleneckClassifier` and :class:`Classifier` wrapping either
    (any module with those two methods).
    """

    def __repr__(self) -> str:
        return "EmbedUnembed()"

    def __call__(self, model: nn.Module, inputs: Any):
        from lightning_repsim.callbacks import Representations

        emb = model.embed(inputs)
        unemb = model.unembed()
        return Representations(logits=logits_from(emb, unemb), embeddings=emb, unembedding=unemb)


class Classifier(pl.LightningModule):
    """Trains a classifier (any ``nn.Module`` giving logits; :class:`TwoTower` or :class:`BottleneckClassifier`
    expose representations) with cross-entropy and Adam.

    Logs ``train_loss`` (step), ``val_loss`` and ``val_acc`` (epoch). ``embed``/``unembed`` forward to
    the wrapped network. When the network has ``embed``/``unembed``, ``validation_step`` returns
    ``{"loss", "logits", "embeddings", "unembedding"}``, which :class:`ReferenceComparison` reuses instead
    of running the student a second time.

    Args:
        net: the network.
        lr: Adam learning rate (the paper: 1e-4).
        weight_decay: Adam weight decay.
        train_log_every: log ``train_loss`` on every ``train_log_every``-th step only (``self.log`` costs
            about a millisecond on CPU, as much as a step of a small MLP).
        one_cycle: use a one-cycle schedule peaking at ``lr`` over the whole fit (default: constant ``lr``,
            the paper's setting).
    """

    def __init__(self, net: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, train_log_every: int = 1,
                 one_cycle: bool = False) -> None:
        super().__init__()
        self.net = net
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.train_log_every = max(1, int(train_log_every))
        self.one_cycle = bool(one_cycle)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.net.embed(x)

    def unembed(self) -> Tensor:
        return self.net.unembed()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        if batch_idx % self.train_log_every == 0:
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=len(y))
        return loss

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        out: dict[str, Tensor] = {}
        if hasattr(self.net, "embed") and hasattr(self.net, "unembed"):
            # hand the representations to ReferenceComparison (it reuses them: no second student forward)
            emb, unemb = self.net.embed(x), self.net.unembed()
            logits = logits_from(emb, unemb)
            out.update(embeddings=emb.detach(), unembedding=unemb.detach())
        else:
            logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return {"loss": loss, "logits": logits.detach(), **out}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.one_cycle:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=max(total, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
