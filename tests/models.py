"""The small named models the tests build (TOML text, as a config file holds it).

One place for them, so a test names the model it uses instead of copying one inline. Each
test's assertions depend on these exact shapes (parameter counts, tensor shapes, halos):
change one only together with the tests that use it; add a new one for a new need. Some
tests edit a model with ``str.replace`` (``units = 11`` -> ``units = 12``), so keep every
key on its own line as written.
"""
from __future__ import annotations

from dbmpi.model import Network

__all__ = [
    "DIGITS_SGD_RUN",
    "LOCAL_DENSE",
    "DENSE_3x4",
    "MLP_20",
    "SOFTMAX_6x6",
    "MIXED_SPATIAL",
    "MIXED_UNEVEN",
    "DENSE_ON_IMAGE",
    "LOCAL_WIDE",
    "network",
    "mixed_spatial",
]

# A whole run config: the digits MLP (8x8x1 -> dense 16 relu -> softmax 10), a data file and
# serial SGD for one epoch. Config validation edits it one key at a time (tests/test_config.py).
DIGITS_SGD_RUN = """
[model]
input_shape = [8, 8, 1]

[[model.layers]]
type = "dense"
units = 16
activation = "relu"

[[model.layers]]
type = "softmax"
units = 10

[data]
path = "data/digits.h5"

[train]
algorithm = "sgd"
learning_rate = 0.1
epochs = 1
"""

# Local 3x3/2 relu -> dense 11 tanh -> softmax 5 on 9x7x1 (checkpoints: dense1.W is (11, 36)).
LOCAL_DENSE = """
[model]
input_shape = [9, 7, 1]
seed = 1
[[model.layers]]
type = "local"
filters = 3
kernel = 3
stride = 2
activation = "relu"
[[model.layers]]
type = "dense"
units = 11
activation = "tanh"
[[model.layers]]
type = "softmax"
units = 5
"""

# Local 3x3/2 relu (2 filters) -> softmax 5 on 64x64x1: examples of 16 KiB, so a partition's
# band of input rows (P = 2: [0, 33) and [32, 63)) leaves out more than a page of each
# (tests/test_data_reads.py).
LOCAL_WIDE = """
[model]
input_shape = [64, 64, 1]
seed = 2
[[model.layers]]
type = "local"
filters = 2
kernel = 3
stride = 2
activation = "relu"
[[model.layers]]
type = "softmax"
units = 5
"""

# Dense 7 tanh -> softmax 3 on 3x4x1 (scoring checkpoints).
DENSE_3x4 = """
[model]
input_shape = [3, 4, 1]
seed = 3
[[model.layers]]
type = "dense"
units = 7
activation = "tanh"
[[model.layers]]
type = "softmax"
units = 3
"""

# A vector-input MLP, 20 -> dense 64 relu -> softmax 10 (learns the synthetic teacher's labels).
MLP_20 = """
[model]
input_shape = [20]
[[model.layers]]
type = "dense"
units = 64
activation = "relu"
[[model.layers]]
type = "softmax"
units = 10
"""

# Only an output layer over a 6x6 input (2-d: the model gives it a channel axis).
SOFTMAX_6x6 = """[model]
input_shape = [6, 6]
[[model.layers]]
type = "softmax"
units = 3
"""

# Every layer type on 10x9x2: local, l2pool, lcn, local with stride, dense, then an output
# layer whose type is filled in by mixed_spatial() (gradients, canonical layout).
MIXED_SPATIAL = """
[model]
input_shape = [10, 9, 2]
seed = 3

[[model.layers]]
type = "local"
filters = 3
kernel = 3
stride = 1
activation = "tanh"

[[model.layers]]
type = "l2pool"
size = 2
stride = 1

[[model.layers]]
type = "lcn"
size = 3

[[model.layers]]
type = "local"
filters = 2
kernel = 2
stride = 2
activation = "sigmoid"

[[model.layers]]
type = "dense"
units = 7
activation = "tanh"

[[model.layers]]
type = "{output}"
units = 4
"""

# Uneven splits everywhere, for the model-parallel plan: odd rows, stride 2, a pool with
# stride 1, lcn reaching past a neighbour's block at P = 4, then dense layers over a
# flattened spatial input (tests/test_partition.py).
MIXED_UNEVEN = """
[model]
name = "mixed"
input_shape = [15, 11, 2]

[[model.layers]]
type = "local"
filters = 3
kernel = 3
stride = 2
activation = "relu"

[[model.layers]]
type = "lcn"
size = 5

[[model.layers]]
type = "l2pool"
size = 3
stride = 1

[[model.layers]]
type = "dense"
units = 7
activation = "tanh"

[[model.layers]]
type = "logistic"
units = 5
"""

# A dense layer first on a spatial (6x5) input, then a softmax.
DENSE_ON_IMAGE = """
[model]
input_shape = [6, 5]

[[model.layers]]
type = "dense"
units = 9
activation = "relu"

[[model.layers]]
type = "softmax"
units = 4
"""


def network(text: str) -> Network:
    """The Network of one of the models above (or of any TOML model text)."""
    return Network.from_string(text)


def mixed_spatial(output: str = "softmax") -> str:
    """MIXED_SPATIAL with the output layer ``output`` ("softmax" or "logistic")."""
    return MIXED_SPATIAL.replace("{output}", output)

# Local 3x3/2 relu -> l2pool 2/1 -> softmax 4 on 13x9x2: the banded passes (tests/model/test_layers.py).
SPATIAL_BANDS = """
[model]
input_shape = [13, 9, 2]
seed = 4
[[model.layers]]
type = "local"
filters = 3
kernel = 3
stride = 2
activation = "relu"
[[model.layers]]
type = "l2pool"
size = 2
stride = 1
[[model.layers]]
type = "softmax"
units = 4
"""
