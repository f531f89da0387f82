"""Local training and evaluation loops, and weight exchange as numpy (no Flower here)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedapp.config import ClientConfig, ConfigError

OPTIMIZERS = ("sgd", "adam")


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's state as a list of float32 arrays, in ``state_dict`` order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights`; shapes must match exactly."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} weight arrays, got {len(weights)}")
    state = OrderedDict((k, torch.as_tensor(np.asarray(w))) for k, w in zip(keys, weights))
    model.load_state_dict(state, strict=True)


def round_lr(cfg: ClientConfig, server_round: int) -> float:
    """Learning rate of ``server_round`` (1-based) under ``client.lr_decay``."""
    return cfg.lr * cfg.lr_decay ** max(0, server_round - 1)


def make_optimizer(cfg: ClientConfig, params, server_round: int = 1) -> torch.optim.Optimizer:  # noqa: ANN001
    """The local optimizer named in ``client.optimizer``, at this round's learning rate."""
    lr = round_lr(cfg, server_round)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown client.optimizer {cfg.optimizer!r}; valid: {list(OPTIMIZERS)}")


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: str = "cpu",
) -> dict[str, float]:
    """Run ``epochs`` passes; return mean training loss/accuracy over the last one."""
    model.to(device).train()
    criterion = nn.CrossEntropyLoss()
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling can draw an empty batch
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = criterion(out, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
    if seen == 0:
        return {"train_loss": float("nan"), "train_accuracy": float("nan")}
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000, device: str = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += criterion(out, y).item()
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    if seen == 0:
        return float("nan"), float("nan")
    return loss_sum / seen, correct / seen
