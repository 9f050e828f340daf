"""PyTorch model factories for the end-to-end tests (named by file path in their configs)."""
import torch
from torch import nn

from dbmpi.model import Network

SOFTMAX_DIGITS = """
[model]
input_shape = [8, 8, 1]
seed = {seed}
[[model.layers]]
type = "softmax"
units = 10
"""


def logistic_like_builtin(seed: int = 0) -> nn.Module:
    """Softmax regression on the digits, starting from the built-in softmax layer's initial
    values for `seed`: W (classes, inputs) over the (rows, cols, maps) flattening, then b."""
    network = Network.from_string(SOFTMAX_DIGITS.format(seed=seed))
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    named = network.named_params()
    with torch.no_grad():
        module[1].weight.copy_(torch.from_numpy(named["softmax0.W"]))
        module[1].bias.copy_(torch.from_numpy(named["softmax0.b"]))
    return module
