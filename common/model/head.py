"""The price head: regression on log(1 + price) from the language model's final hidden state.

Pooling: the hidden state of the prompt's last token, the `<|im_start|>assistant\\n` that opens the answer. In a
causal model only that position has attended to the whole input (catalog text and image), and it is the state the
text objective writes the price from; the system prompt's tokens, identical in every sample, and the image pads
would only dilute a mean. The head is a 2-layer MLP in float32 (hidden -> 256 -> 1, GELU), its output bias
started at the training split's mean log price, so training begins at the geometric-mean predictor.

Loss: L1 on log(1 + price) (the one kept: docs/objective.md compares it with a SMAPE surrogate).
A prediction becomes a price as expm1(y), clamped to the training prices' positive floor. The head is saved
beside the adapter as `price_head.safetensors` (and in each checkpoint), with its sizes in head_config.json.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

HEAD_FILE, HEAD_CONFIG = "price_head.safetensors", "head_config.json"
LAST_POSITIONS, PRICE_TARGETS = "last_positions", "price_targets"  # batch keys of the regression collator


class PriceHead(nn.Module):
    def __init__(self, hidden: int, width: int = 256, mean_log_price: float = 0.0):
        super().__init__()
        self.hidden, self.width = hidden, width
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 1))
        with torch.no_grad():
            self.net[2].weight.mul_(0.1)
            self.net[2].bias.fill_(mean_log_price)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows] predicted log(1 + price)."""
        return self.net(pooled.float()).squeeze(-1)


def pooled(hidden_states: torch.Tensor, last_positions: torch.Tensor) -> torch.Tensor:
    """[rows, length, hidden] at each row's last prompt token -> [rows, hidden]."""
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_positions]


def regression_loss(predicted_log: torch.Tensor, prices: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of L1 on log(1 + price)."""
    return (predicted_log - torch.log1p(prices.float())).abs().mean()


def to_prices(predicted_log: torch.Tensor, floor: float) -> list[float]:
    return torch.expm1(predicted_log.float()).clamp(min=floor).tolist()


def attach_head(model, mean_log_price: float) -> PriceHead:
    """A new head registered on the (peft) model, so that the Trainer optimizes it and DDP keeps it in step."""
    hidden = model.config.get_text_config(decoder=True).hidden_size
    head = PriceHead(hidden, mean_log_price=mean_log_price).to(next(model.parameters()).device)
    model.price_head = head
    return head


def save_head(head: PriceHead, folder: Path, floor: float) -> None:
    from safetensors.torch import save_file

    from common.fsio import atomic_path, write_json
    with atomic_path(Path(folder) / HEAD_FILE) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    write_json(Path(folder) / HEAD_CONFIG, {"hidden": head.hidden, "width": head.width, "price_floor": floor,
                                            "target": "log1p(price)", "pooling": "last prompt token"})


def load_head(folder: Path, device) -> tuple[PriceHead, float]:
    """(head, price floor) saved by save_head."""
    import json

    from safetensors.torch import load_file
    config = json.loads((Path(folder) / HEAD_CONFIG).read_text())
    head = PriceHead(config["hidden"], config["width"])
    head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
    return head.to(device).eval(), config["price_floor"]


def load_head_weights(head: PriceHead, folder: Path) -> None:
    """Put a checkpoint's head weights into the model's head (resuming)."""
    from safetensors.torch import load_file
    state = load_file(str(Path(folder) / HEAD_FILE))
    with torch.no_grad():
        for name, param in head.state_dict().items():
            param.copy_(state[name])


def mean_log_price(prices: list[float]) -> float:
    return sum(math.log1p(p) for p in prices) / len(prices) if prices else 0.0
