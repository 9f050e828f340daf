"""A small PyTorch CNN for dbmpi's image data sets (digits 8x8, Fashion-MNIST 28x28): two
3x3 convolutions, 2x2 max pooling, one hidden dense layer. dbmpi has no convolution layer
of its own; through the PyTorch adapter it trains this with Downpour or Sandblaster.

    [model]
    input_shape = [8, 8, 1]
    python = "../examples/torch_cnn.py:make_cnn"   # relative to the config file
    [model.args]
    image = 8
"""
from torch import nn


def make_cnn(image: int = 8, channels: int = 1, classes: int = 10, width: int = 16, hidden: int = 64,
             dropout: float = 0.0) -> nn.Module:
    """The CNN for `image` x `image` inputs with `channels` channels; logits for `classes`."""
    if image % 2:
        raise ValueError(f"image: must be even (2x2 pooling), got {image}")
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * width * (image // 2) ** 2, hidden), nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def make_logistic(inputs: int = 64, classes: int = 10) -> nn.Module:
    """Multinomial logistic regression: the built-in softmax layer's model, in torch."""
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))
