"""The demo's data and training recipe: the SPEC §7 radial task (default) or scikit-learn's bundled digits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DemoData", "ShiftAugment", "load_data", "load_digits_split", "load_radial_split"]


def load_radial_split(num_classes: int = 6, n_train: int = 8000, n_test: int = 2000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the SPEC §7 radial task (data seeds 0 and 1; generated, no download)."""
    from lightning_repsim.constructions import radial_dataset

    x_train, y_train = radial_dataset(n_train, num_classes, seed=0)
    x_test, y_test = radial_dataset(n_test, num_classes, seed=1)
    return x_train, y_train, x_test, y_test


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: scikit-learn's bundled digits scaled to [0, 1], a stratified split
    fixed by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(test_fraction * len(idx))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return x[tr], y[tr], x[te], y[te]


class ShiftAugment:
    """Collate function for 8x8 digits: stack a batch and shift each image by up to one pixel (zero fill), with
    probability 1/2."""

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([it[0] for it in items]).view(-1, 1, 8, 8)
        y = torch.stack([it[1] for it in items])
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        offsets = torch.randint(0, 3, (x.shape[0], 2))
        offsets[torch.rand(x.shape[0]) < 0.5] = 1  # no shift
        out = torch.empty_like(x)
        for dy in range(3):
            for dx in range(3):
                sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
                if sel.any():
                    out[sel] = padded[sel, :, dy : dy + 8, dx : dx + 8]
        return out.view(-1, 64), y


@dataclass
class DemoData:
    """A data set and the training recipe the demo uses on it."""

    name: str
    description: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 0.0
    collate: Callable | None = None

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    @property
    def in_dim(self) -> int:
        return int(self.x_train.shape[1])

    def model(self) -> nn.Module:
        """MLP ``in -> hidden (ReLU) -> 2`` (the embedding f) then ``nn.Linear(2, K)`` (the unembedding g)."""
        from lightning_repsim.models import BottleneckClassifier

        return BottleneckClassifier(self.in_dim, self.num_classes, hidden=self.hidden, rep_dim=2)

    def loaders(self, seed: int):
        """``(train, test)`` data loaders: shuffled training batches drawn by a generator seeded with ``seed``, the
        held-out points in batches of 500."""
        from torch.utils.data import DataLoader, TensorDataset

        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=self.batch_size, shuffle=True,
                           generator=gen, collate_fn=self.collate)
        test = DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=500)
        return train, test


def load_data(name: str = "radial") -> DemoData:
    """The demo's data and recipe: ``"radial"`` (default, SPEC §7) or ``"digits"`` (scikit-learn, bundled)."""
    if name == "radial":
        x_tr, y_tr, x_te, y_te = load_radial_split()
        return DemoData("radial", "Radial data (SPEC §7, lightning_repsim.radial_dataset; generated, no download): "
                        f"{len(y_tr)} training and {len(y_te)} held-out points in 2-D, 6 classes (antipodal wedges).",
                        x_tr, y_tr, x_te, y_te, hidden=(64, 64, 64), epochs=30, batch_size=64)
    if name == "digits":
        x_tr, y_tr, x_te, y_te = load_digits_split()
        return DemoData("digits", f"Digits (scikit-learn, bundled): {len(y_tr)} training and {len(y_te)} held-out "
                        "images of 8x8 pixels, 10 classes.", x_tr, y_tr, x_te, y_te, hidden=(256, 256, 256), epochs=40,
                        batch_size=32, weight_decay=1e-4, collate=ShiftAugment())
    raise ValueError(f"unknown data set {name!r} (radial or digits)")
