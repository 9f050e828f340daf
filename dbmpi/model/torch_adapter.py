"""The PyTorch adapter: an `nn.Module` as a dbmpi model (dbmpi.model.protocol).

The module's parameters become views into the model's flat float32 vector, in
`named_parameters()` order (their names are the tensors' names, in checkpoints too), and
their `.grad` views into the flat gradient: a fetch from the shards writes the module's
weights in place and `backward()` accumulates into the vector the pushes read, with no copy
per step. The module sees images as (N, C, H, W) and flat inputs as (N, D), torch's
conventions (dbmpi's data files store (N, H, W, C)); its output must be (N, classes) logits.
The loss is the mean cross-entropy of softmax(logits), like the built-in softmax layer.

Training steps run the module in train mode (dropout on), evaluation in eval mode.
Buffers (BatchNorm's running statistics) are not parameters: they are not shared through
the shards nor checkpointed; each rank keeps the ones its module made (docs/API.md).

torch is imported here only: dbmpi does not depend on it (the `torch` extra installs it).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dbmpi.model.protocol import FlatModel, tensors_of


def _targets(labels: np.ndarray) -> torch.Tensor:
    """Class labels as cross_entropy takes them (int64)."""
    return torch.from_numpy(np.asarray(labels, dtype=np.int64))


class TorchModelError(ValueError):
    """A module the adapter cannot train (no parameters, wrong output shape)."""


class TorchModel(FlatModel):
    """`module` over one flat parameter vector (see the module docstring). The initial
    values are the module's own, as its factory made them (seed them before making it)."""

    def __init__(self, module: torch.nn.Module, input_shape, *, name: str = "model", seed: int = 0):
        named = list(module.named_parameters())
        if not named:
            raise TorchModelError(f"{type(module).__name__} has no parameters: nothing to train")
        module.float()  # dbmpi's vector is float32
        super().__init__(tensors_of((n, tuple(p.shape)) for n, p in named), input_shape, 1, name=name, seed=seed)
        self.module = module
        self.torch_params = [p for _, p in named]
        with torch.no_grad():
            self._initial = torch.cat([p.detach().reshape(-1) for p in self.torch_params]).numpy().copy()
        self.n_classes = self._output_classes()
        self._activation_values: int | None = None

    # Structure ---------------------------------------------------------------------------
    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        """A batch as the module takes it: NHWC float32 rows to an NCHW view (no copy)."""
        x = np.asarray(x, dtype=np.float32)
        x = x.reshape((len(x),) + self.input_shape)
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.permute(0, 3, 1, 2) if t.dim() == 4 else t

    def _output_classes(self) -> int:
        """Run two zero examples through the module: its logits must be (2, classes)."""
        self.module.eval()
        probe = self._inputs(np.zeros((2,) + self.input_shape, np.float32))
        with torch.no_grad():
            try:
                out = self.module(probe)
            except Exception as exc:  # noqa: BLE001 - any error of the user's module, said in one line
                raise TorchModelError(f"{type(self.module).__name__} fails on input of shape {tuple(probe.shape)} "
                                      f"(model.input_shape {list(self.input_shape)}): "
                                      f"{type(exc).__name__}: {exc}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TorchModelError(f"{type(self.module).__name__} must return logits of shape (N, classes); "
                                  f"for 2 examples it returned {shape}")
        return int(out.shape[1])

    def bind(self, params: np.ndarray, grad: np.ndarray) -> None:
        """Make every parameter, and its gradient, a view into the flat vectors."""
        for t, p in zip(self.tensors, self.torch_params, strict=True):
            p.data = torch.from_numpy(self.view(t, params))
            p.grad = torch.from_numpy(self.view(t, grad))

    def initial_values(self, lo: int, hi: int, out: np.ndarray | None = None,
                       seed: int | None = None) -> np.ndarray:
        if seed is not None and seed != self.seed:
            raise ValueError(f"a torch model's initial values are its factory's, made with seed {self.seed}; "
                             f"for seed {seed} build the model again")
        if not 0 <= lo <= hi <= self.n_params:
            raise ValueError(f"range [{lo}, {hi}) is outside the {self.n_params} parameters")
        out = np.empty(hi - lo, np.float32) if out is None else out
        out[:] = self._initial[lo:hi]
        return out

    # Passes ------------------------------------------------------------------------------
    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Mean cross-entropy of the batch; its gradient lands in `grad` (zeroed first)."""
        self.grad.fill(0.0)
        self.module.train()
        loss = F.cross_entropy(self.module(self._inputs(x)), _targets(labels))
        loss.backward()
        return float(loss.detach())

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.module.eval()
        with torch.no_grad():
            return self.module(self._inputs(x)).numpy()

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        self.module.eval()
        with torch.no_grad():
            return float(F.cross_entropy(self.module(self._inputs(x)), _targets(labels)))

    # Description -------------------------------------------------------------------------
    def activation_bytes(self, batch: int, training: bool = True) -> int:
        """Estimated from one evaluation: every submodule's output per example (and in
        training as much again for their gradients)."""
        if self._activation_values is None:
            values = [0]

            def count(_module, _inputs, output):
                if isinstance(output, torch.Tensor):
                    values[0] += output.numel()

            hooks = [m.register_forward_hook(count) for m in self.module.modules() if m is not self.module]
            try:
                self.module.eval()
                with torch.no_grad():
                    self.module(self._inputs(np.zeros((1,) + self.input_shape, np.float32)))
            finally:
                for hook in hooks:
                    hook.remove()
            self._activation_values = values[0] + self.n_classes
        return 4 * batch * self._activation_values * (2 if training else 1)

    def summary(self) -> str:
        head, *rows = super().summary().splitlines()
        return "\n".join([head.replace("(TorchModel)", f"(torch {type(self.module).__name__})"), *rows])

    def state_dict(self) -> dict:
        """The module's state_dict (parameters from the flat vector, buffers its own)."""
        return self.module.state_dict()


__all__ = ["TorchModel", "TorchModelError"]
