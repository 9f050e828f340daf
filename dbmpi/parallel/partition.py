"""The model-parallel plan of one replica: which output units each of P partitions owns.

Pure and MPI-free, so `dbmpi plan` can print it and every rank derives the same plan.

Dense layers (and the output layer) split their output units into P balanced contiguous
blocks and need all of the layer below (gathered with Allgatherv; input gradients go back
by reduce-scatter). Spatial layers (local, l2pool, lcn) split their output rows into P
blocks and need only the input rows in their receptive field; the rows outside the
partition's own block of the layer below (the halo) come from the partitions that own
them, and their gradients go back in the backward pass. The network input is not owned:
each partition reads the input rows its first layer needs from the dataset file.

Tensors are output-unit-major, so a partition's parameters are one contiguous canonical
range per tensor. Byte counts are float32 per example; multiply by the batch for a step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dbmpi.runtime.layout import balanced_ranges

SPATIAL = ("local", "l2pool", "lcn")
FLOAT_BYTES = 4
SOFTMAX_BYTES = 4 + 8  # per example: max (float32) and sum of exp (float64), Allreduced across classes


class PartitionError(ValueError):
    """A partition count the model cannot be split into; the message names the layer."""


@dataclass(frozen=True)
class LayerPart:
    """One partition's share of one layer.

    owned: output units (dense) or rows (spatial); needed: input units (dense, flattened)
    or rows (spatial); own_input: the block of the input this partition already holds (None
    for the network input, which it reads from the file); halo: (partition, start, stop)
    pieces of the needed input received from other partitions; bytes per example.
    """

    partition: int
    owned: tuple[int, int]
    needed: tuple[int, int]
    own_input: tuple[int, int] | None
    halo: tuple[tuple[int, int, int], ...]
    param_ranges: tuple[tuple[int, int], ...]
    forward_recv: int = 0
    forward_send: int = 0
    backward_recv: int = 0
    backward_send: int = 0

    @property
    def halo_above(self) -> int:
        """Input rows/units received from lower-numbered partitions (rows above)."""
        return sum(b - a for q, a, b in self.halo if q < self.partition)

    @property
    def halo_below(self) -> int:
        """Input rows/units received from higher-numbered partitions (rows below)."""
        return sum(b - a for q, a, b in self.halo if q > self.partition)

    @property
    def n_params(self) -> int:
        return sum(b - a for a, b in self.param_ranges)

    def bytes(self) -> dict[str, int]:
        return {"forward_recv": self.forward_recv, "forward_send": self.forward_send,
                "backward_recv": self.backward_recv, "backward_send": self.backward_send}


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is split: by output "units" (dense) or "rows" (spatial).

    input_split is "units" (dense: the layer below flattened) or "rows"; input_width is the
    number of values in one input unit or row (1, or cols x maps), output_width likewise
    for the layer's own units or rows; from_file marks the
    network input (no communication).
    """

    index: int
    name: str
    kind: str
    where: str
    split: str
    input_split: str
    input_width: int
    output_width: int
    from_file: bool
    need_input_grad: bool
    parts: tuple[LayerPart, ...]

    @property
    def blocks(self) -> tuple[tuple[int, int], ...]:
        return tuple(part.owned for part in self.parts)


def receptive_rows(layer, r0: int, r1: int) -> tuple[int, int]:
    """The input rows [start, stop) that output rows [r0, r1) of a spatial layer read."""
    rows = layer.input_shape[0]
    if layer.kind == "local":
        return r0 * layer.stride, (r1 - 1) * layer.stride + layer.kernel
    if layer.kind == "l2pool":
        return r0 * layer.stride, (r1 - 1) * layer.stride + layer.size
    if layer.kind == "lcn":
        # Subtracts a local mean, then divides by a local std of the centred values: two
        # windows deep.
        reach = 2 * (layer.size // 2)
        return max(0, r0 - reach), min(rows, r1 + reach)
    raise ValueError(f"{layer.kind} is not a spatial layer")


BANDED = ("local", "l2pool")  # kinds whose block can compute any band of its output rows


@dataclass(frozen=True)
class BandOrder:
    """The order in which a partition computes its block of one spatial layer's output rows
    when exchanges overlap compute (rows relative to the block's first owned row).

    mode "interior": `before` are the rows its own input rows cover, computed while the
    halo rows travel; `after` the border rows, computed once they are in. Mode "sent":
    `before` are the rows the next layer's other partitions need, computed first so their
    exchange can start; `after` the rest, computed while it travels.
    """

    mode: str
    before: tuple[tuple[int, int], ...]
    after: tuple[tuple[int, int], ...]


def _complement(bands, stop: int) -> tuple[tuple[int, int], ...]:
    """The rows of [0, stop) outside `bands` (sorted, disjoint), as bands."""
    rest, start = [], 0
    for a, b in bands:
        if start < a:
            rest.append((start, a))
        start = b
    if start < stop:
        rest.append((start, stop))
    return tuple(rest)


def interior_rows(layer, part) -> tuple[int, int]:
    """The band of `part`'s owned output rows of spatial `layer` whose receptive rows all lie
    in its own block of the input, relative to its first owned row; empty: (0, 0)."""
    a, b = part.owned
    c0, c1 = part.own_input
    inside = [r for r in range(a, b) if c0 <= receptive_rows(layer, r, r + 1)[0]
              and receptive_rows(layer, r, r + 1)[1] <= c1]  # contiguous: receptive rows grow with r
    return (inside[0] - a, inside[-1] + 1 - a) if inside else (0, 0)


def sent_rows(plan, index: int, partition: int) -> tuple[tuple[int, int], ...]:
    """The rows of layer `index`'s owned output that the next layer's other partitions
    receive from `partition` as halo, relative to its first owned row, merged."""
    if index + 1 >= len(plan.layers) or plan.layers[index + 1].input_split != "rows":
        return ()
    a = plan.layers[index].parts[partition].owned[0]
    return tuple((r0 - a, r1 - a) for r0, r1 in _merge(
        (r0, r1) for part in plan.layers[index + 1].parts for q, r0, r1 in part.halo if q == partition))


def band_orders(network, plan, partition: int) -> tuple[BandOrder | None, ...]:
    """Per layer, how `partition` orders its rows to overlap the exchanges (None: the whole
    block at once). A local or l2pool block with halo rows to receive computes its interior
    first; one whose output other partitions need computes their rows first."""
    orders: list[BandOrder | None] = []
    for index, (layer, lplan) in enumerate(zip(network.layers, plan.layers, strict=True)):
        order = None
        if layer.kind in BANDED and plan.n_partitions > 1:
            part = lplan.parts[partition]
            rows = part.owned[1] - part.owned[0]
            if part.halo:
                band = interior_rows(layer, part)
                if band[0] < band[1]:
                    order = BandOrder("interior", (band,), _complement((band,), rows))
            else:
                sent = sent_rows(plan, index, partition)
                if sent and sent != ((0, rows),):
                    order = BandOrder("sent", sent, _complement(sent, rows))
        orders.append(order)
    return tuple(orders)


def _merge(ranges) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _check_partitions(network, n_partitions) -> None:
    if isinstance(n_partitions, bool) or not isinstance(n_partitions, int) or n_partitions < 1:
        raise PartitionError(f"train.n_partitions: must be a positive integer, got {n_partitions!r}")
    for layer in network.layers:
        spatial = layer.kind in SPATIAL
        size = layer.output_shape[0]
        if n_partitions > size:
            what = "output rows" if spatial else "output units"
            raise PartitionError(
                f"train.n_partitions: {n_partitions} partitions but layer {layer.name} "
                f"({layer.where}) has only {size} {what}; use at most {size} partitions")


@dataclass(frozen=True)
class PartitionPlan:
    """Every layer's split across n_partitions, with parameters and communication volume."""

    n_partitions: int
    n_params: int
    input_shape: tuple[int, ...]
    layers: tuple[LayerPlan, ...]
    input_ranges: tuple[tuple[int, int], ...]

    @classmethod
    def for_network(cls, network, n_partitions: int) -> PartitionPlan:
        """The plan of a model across `n_partitions`. A model dbmpi cannot split (a Python
        model) has one partition: a plan without layer plans, the whole vector its block."""
        if not getattr(network, "partitionable", True):
            return cls.whole(network, n_partitions)
        _check_partitions(network, n_partitions)
        P = n_partitions
        layers: list[LayerPlan] = []
        below_blocks = None  # the previous layer's owned blocks
        below_spatial = len(network.input_shape) == 3
        for index, layer in enumerate(network.layers):
            spatial = layer.kind in SPATIAL
            blocks = balanced_ranges(layer.output_shape[0], P)
            from_file = index == 0
            n_in = math.prod(layer.input_shape)
            if spatial:
                input_split, width = "rows", n_in // layer.input_shape[0]
                needed = [receptive_rows(layer, a, b) for a, b in blocks]
                own = below_blocks  # spatial layers only follow spatial ones (or the input)
            else:
                input_split, width = "units", 1
                needed = [(0, n_in)] * P
                if below_blocks is None:
                    own = None
                else:
                    # A spatial layer below is flattened row-major: a row is cols x maps units.
                    unit = n_in // network.layers[index - 1].output_shape[0] if below_spatial else 1
                    own = tuple((a * unit, b * unit) for a, b in below_blocks)
            halos = []
            for p in range(P):
                if from_file:
                    halos.append(())
                    continue
                n0, n1 = needed[p]
                halos.append(tuple((q, max(n0, a), min(n1, b)) for q, (a, b) in enumerate(own)
                                   if q != p and max(n0, a) < min(n1, b)))
            recv = [FLOAT_BYTES * width * sum(b - a for _, a, b in h) for h in halos]
            send = [0] * P
            for h in halos:
                for q, a, b in h:
                    send[q] += FLOAT_BYTES * width * (b - a)
            need_grad = not from_file and any(lower.has_params for lower in network.layers[:index])
            extra = 0
            if layer.kind == "softmax" and P > 1:
                extra = SOFTMAX_BYTES * (P - 1)
            tensors = [t for t in network.tensors if t.layer == index]
            parts = []
            for p, (a, b) in enumerate(blocks):
                params = []
                for t in tensors:
                    row = t.size // t.shape[0]
                    params.append((t.offset + a * row, t.offset + b * row))
                parts.append(LayerPart(
                    partition=p, owned=(a, b), needed=tuple(needed[p]),
                    own_input=None if own is None else tuple(own[p]), halo=halos[p],
                    param_ranges=tuple(params),
                    forward_recv=recv[p] + extra, forward_send=send[p] + extra,
                    # Backward mirrors forward: halo / input gradients go back to their owners.
                    backward_recv=send[p] if need_grad else 0,
                    backward_send=recv[p] if need_grad else 0))
            layers.append(LayerPlan(index, layer.name, layer.kind, layer.where,
                                    "rows" if spatial else "units", input_split, width,
                                    math.prod(layer.output_shape[1:]),
                                    from_file, need_grad, tuple(parts)))
            below_blocks, below_spatial = blocks, spatial
        first = layers[0]
        if first.input_split == "rows":
            input_ranges = tuple(part.needed for part in first.parts)
        else:
            input_ranges = ((0, network.input_shape[0]),) * P
        return cls(P, network.n_params, tuple(network.input_shape), tuple(layers), input_ranges)

    @classmethod
    def whole(cls, model, n_partitions: int = 1) -> PartitionPlan:
        """One partition holding the whole model (refused for more: it cannot be split)."""
        if n_partitions != 1:
            raise PartitionError(f"train.n_partitions: {n_partitions} partitions, but a Python model "
                                 "(model.python) trains as one partition per replica: dbmpi splits only "
                                 "[[model.layers]] networks; set train.n_partitions = 1")
        shape = tuple(model.input_shape)
        return cls(1, model.n_params, shape, (), ((0, shape[0]),))

    # Queries ------------------------------------------------------------------------------
    def _check(self, partition: int) -> None:
        if not 0 <= partition < self.n_partitions:
            raise PartitionError(f"partition {partition} is outside the plan's {self.n_partitions} partitions")

    def input_rows(self, partition: int) -> tuple[int, int]:
        """Rows of the network input the partition reads (all of them for dense-first networks)."""
        self._check(partition)
        return self.input_ranges[partition]

    def param_ranges(self, partition: int) -> list[tuple[int, int]]:
        """The partition's canonical parameter ranges, sorted, adjacent ones merged."""
        self._check(partition)
        if not self.layers:  # a whole model (PartitionPlan.whole)
            return [(0, self.n_params)]
        return _merge(r for layer in self.layers for r in layer.parts[partition].param_ranges)

    def n_params_of(self, partition: int) -> int:
        return sum(b - a for a, b in self.param_ranges(partition))

    def units_of(self, partition: int) -> int:
        """Output values (units, or rows x cols x maps) the partition computes per example."""
        total = 0
        for layer in self.layers:
            a, b = layer.parts[partition].owned
            total += (b - a) * layer.output_width
        return total

    def bytes_per_example(self, partition: int) -> dict[str, int]:
        """float32 bytes the partition receives and sends per example, per direction."""
        self._check(partition)
        totals = dict.fromkeys(("forward_recv", "forward_send", "backward_recv", "backward_send"), 0)
        for layer in self.layers:
            for key, value in layer.parts[partition].bytes().items():
                totals[key] += value
        return totals

    # Description --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["partitions"] = [
            {"partition": p, "param_ranges": [list(r) for r in self.param_ranges(p)],
             "n_params": self.n_params_of(p), "bytes_per_example": self.bytes_per_example(p)}
            for p in range(self.n_partitions)]
        return data

    def describe(self, batch_size: int = 1) -> str:
        P = self.n_partitions
        lines = [f"model parallelism: {P} partition(s) per replica; bytes per step of "
                 f"{batch_size} example(s), float32"]
        lines.append(f"  {'#':>2}  {'layer':<12} {'split':<6} blocks per partition")
        for layer in self.layers:
            blocks = " ".join(f"[{a},{b})" for a, b in layer.blocks)
            comm = ("input from file" if layer.from_file else
                    "allgatherv" if layer.input_split == "units" else "halo rows")
            if layer.kind == "softmax" and P > 1:
                comm += " + allreduce max/sum"
            lines.append(f"  {layer.index:>2}  {layer.name:<12} {layer.split:<6} {blocks}  ({comm})")
        lines.append(f"  {'part':>4}  {'units':>10} {'parameters':>12} {'fwd send':>10} "
                     f"{'fwd recv':>10} {'bwd send':>10} {'bwd recv':>10}  input rows")
        for p in range(P):
            b = {k: v * batch_size for k, v in self.bytes_per_example(p).items()}
            r0, r1 = self.input_rows(p)
            lines.append(f"  {p:>4}  {self.units_of(p):>10,} {self.n_params_of(p):>12,} "
                         f"{_size(b['forward_send']):>10} {_size(b['forward_recv']):>10} "
                         f"{_size(b['backward_send']):>10} {_size(b['backward_recv']):>10}  [{r0}, {r1})")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    if nbytes == 0:
        return "-"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB"


def plan_for(train: dict, network) -> PartitionPlan:
    """The plan a validated [train] table asks for."""
    return PartitionPlan.for_network(network, train.get("n_partitions", 1))


__all__ = ["BandOrder", "LayerPart", "LayerPlan", "PartitionError", "PartitionPlan", "band_orders",
           "interior_rows", "plan_for", "receptive_rows", "sent_rows"]
