"""Networks built from TOML: layers over one canonical flat parameter vector."""
from dbmpi.model.layers import LAYER_TYPES, Layer
from dbmpi.model.network import Network, Tensor

__all__ = ["LAYER_TYPES", "Layer", "Network", "Tensor"]
