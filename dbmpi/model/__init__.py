"""Models over one canonical flat parameter vector: the model protocol, the built-in networks
(TOML layer lists), and Python models (a factory; PyTorch modules through an adapter)."""
from dbmpi.model.layers import LAYER_TYPES, Layer
from dbmpi.model.network import Network
from dbmpi.model.protocol import FlatModel, Model, Tensor, tensors_of

__all__ = ["LAYER_TYPES", "FlatModel", "Layer", "Model", "Network", "Tensor", "tensors_of"]
