"""One model partition: the layers' blocks a rank owns, run together with the other P - 1
partitions of its replica over `replica_comm` (the paper's model parallelism).

The plan (dbmpi.parallel.partition) says which output units or rows of every layer this partition
owns and which inputs it needs. Each layer's block is an ordinary layer of the same type,
built on the block's shape, so the compiled kernels do the work unchanged; this module only
assembles each block's input and sends back its input gradient:

- a dense layer gathers the layer below once per step (`Allgatherv`); the input gradients it
  computes for every unit below are summed at their owners (`Reduce_scatter`);
- a spatial layer (local, l2pool, lcn) receives only its halo rows from the partitions that
  own them and returns their gradients, which the owners add to their own;
- an output layer split by classes computes its loss with an `Allreduce` of the per-example
  max and sum of exponentials (softmax), or of the loss alone (one-vs-all logistic).

With overlap=True the halo exchanges run behind compute: a local or l2pool block
computes the rows its own input covers while its halo rows travel and the border rows after
(or, when the next layer's partitions need some of its rows, those first, then the rest
while they travel), and a local block sends its input gradient's halo rows back before it
computes its weight gradients. The rows computed are the same, so are the results. It is
off by default: on the machines measured it did not make the step faster
(docs/BENCHMARKS.md, "Exchanges overlapped with compute").

The partition's parameters live in one local vector: its canonical ranges concatenated in
canonical order (dbmpi.parallel.partition.PartitionPlan.param_ranges), which is also what it fetches
from and pushes to the shards.
"""
from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from dbmpi.model.layers import LAYER_TYPES, Layer
from dbmpi.model.network import Network
from dbmpi.model.protocol import evaluate_in_batches
from dbmpi.parallel.partition import SOFTMAX_BYTES, PartitionPlan, band_orders

OUTPUT_KINDS = ("softmax", "logistic")


class _Exchange:
    """A posted exchange of rows with the other partitions: its requests, the receive
    buffers with the rows (start, stop) they fill, and the send buffers kept alive."""

    def __init__(self, receiving: bool):
        self.receiving = receiving
        self.requests: list = []
        self.landing: list[tuple[np.ndarray, int, int]] = []
        self.sending: list[np.ndarray] = []

    def finish(self, target: np.ndarray, offset: int, add: bool = False) -> None:
        """Wait for every transfer, then put (or with add, add) each received piece into
        its rows of `target`, whose first row is row `offset`."""
        MPI.Request.Waitall(self.requests)
        for buf, a, b in self.landing:
            if add:
                target[:, a - offset:b - offset] += buf
            else:
                target[:, a - offset:b - offset] = buf
        self.landing, self.sending = [], []


class PartitionedNetwork:
    """This rank's partition of a network split across `comm` (the replica's partitions).

    Every method that runs the model (forward, loss, loss_and_grad, evaluate) is collective
    over `comm`: all partitions call it with the same batch, each with the input rows
    `input_rows` of it. Construction is local (no communication). By default every exchange
    completes before its layer computes; overlap=True computes behind them (same results).
    """

    def __init__(self, network: Network, comm: MPI.Intracomm, plan: PartitionPlan | None = None,
                 overlap: bool = False):
        self.network = network
        self.comm = comm
        self.n_partitions = comm.size
        self.partition = comm.rank
        self.plan = plan if plan is not None else PartitionPlan.for_network(network, comm.size)
        if self.plan.n_partitions != comm.size:
            raise ValueError(f"the plan has {self.plan.n_partitions} partitions but the "
                             f"communicator {comm.size} ranks")
        p = self.partition
        self.ranges = self.plan.param_ranges(p)
        self.n_params = sum(b - a for a, b in self.ranges)
        self.params = np.zeros(self.n_params, np.float32)
        self.grad = np.zeros(self.n_params, np.float32)
        self.input_rows = self.plan.input_rows(p)
        self.n_classes = network.n_classes
        self.bytes_sent = 0
        self.bytes_received = 0

        self.layers: list[Layer] = []
        for index, (layer, lplan) in enumerate(zip(network.layers, self.plan.layers, strict=True)):
            part = lplan.parts[p]
            a, b = part.owned
            spec = dict(layer.spec)
            if lplan.split == "units":
                spec["units"] = b - a
                shape = layer.input_shape
            else:
                n0, n1 = part.needed
                shape = (n1 - n0,) + layer.input_shape[1:]
            block = LAYER_TYPES[layer.kind](spec, shape, layer.where)
            if lplan.split == "rows" and layer.kind != "lcn":
                assert block.output_shape[0] == b - a, (layer.name, block.output_shape, part)
            self._bind(block, index, a, b)
            self.layers.append(block)
        self.output = self.layers[-1]
        self.class_range = self.plan.layers[-1].parts[p].owned
        self.overlap = overlap and self.n_partitions > 1
        self.orders = (band_orders(network, self.plan, p) if self.overlap
                       else (None,) * len(self.layers))
        if network.allocated:  # a whole model given: its values
            self.load_canonical(network.params)
        else:  # the structure only (a run): its own ranges' initial values, drawn directly
            self.init_params()

    # Parameters ---------------------------------------------------------------------------
    def local_offset(self, canonical: int) -> int:
        """Where canonical parameter index `canonical` sits in this partition's vector."""
        local = 0
        for a, b in self.ranges:
            if a <= canonical < b:
                return local + canonical - a
            local += b - a
        raise IndexError(f"parameter {canonical} is not in partition {self.partition}")

    def _bind(self, block: Layer, index: int, a: int, b: int) -> None:
        params, grads = {}, {}
        for tensor in self.network.tensors:
            if tensor.layer != index:
                continue
            row = tensor.size // tensor.shape[0]
            start = self.local_offset(tensor.offset + a * row)
            shape = (b - a,) + tensor.shape[1:]
            name = tensor.name.split(".")[-1]
            params[name] = self.params[start:start + math.prod(shape)].reshape(shape)
            grads[name] = self.grad[start:start + math.prod(shape)].reshape(shape)
        block.bind(params, grads)

    def init_params(self) -> None:
        """Its ranges' initial values, drawn directly (the network holds only its structure:
        no rank builds the whole vector to take a part of it)."""
        local = 0
        for a, b in self.ranges:
            self.network.initial_values(a, b, self.params[local:local + b - a])
            local += b - a

    def load_canonical(self, full: np.ndarray) -> None:
        """Copy this partition's ranges out of a full canonical vector."""
        local = 0
        for a, b in self.ranges:
            self.params[local:local + b - a] = full[a:b]
            local += b - a

    def to_canonical(self, flat: np.ndarray, out: np.ndarray) -> None:
        """Scatter a local vector (params or grad) into its places in a canonical vector."""
        local = 0
        for a, b in self.ranges:
            out[a:b] = flat[local:local + b - a]
            local += b - a

    # Forward ------------------------------------------------------------------------------
    def _shape_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        first = self.layers[0]
        shape = first.input_shape
        if x.ndim < 2 or math.prod(x.shape[1:]) != math.prod(shape):
            raise ValueError(f"x: partition {self.partition} expects examples of shape {shape} "
                             f"(input rows {self.input_rows}), got {x.shape[1:]}")
        return np.ascontiguousarray(x.reshape((x.shape[0],) + shape), dtype=np.float32)

    def _owned(self, index: int, y: np.ndarray) -> np.ndarray:
        """The owned block of a layer's output (an lcn block computes its halo rows too)."""
        lplan = self.plan.layers[index]
        if lplan.kind != "lcn":
            return y
        part = lplan.parts[self.partition]
        n0 = part.needed[0]
        a, b = part.owned
        return y[:, a - n0:b - n0]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The owned logits (N, classes owned) of a batch; collective over the replica."""
        x = self._shape_input(x)
        started = None  # the next layer's halo exchange, when a layer started it early
        for index in range(len(self.layers)):
            pending = None
            if index > 0:
                x, pending = self._gather_input(index, x, started)
            x, started = self._compute(index, x, pending)
        return x

    def _gather_input(self, index: int, below: np.ndarray, started=None):
        """Layer `index`'s input assembled from the owned output of the layer below, and its
        halo exchange when still in flight (overlap; else None)."""
        lplan = self.plan.layers[index]
        if self.n_partitions == 1:
            return (below if below.flags.c_contiguous else np.ascontiguousarray(below)), None
        if lplan.input_split == "units":
            return self._allgather(index, below), None
        pending = started if started is not None else self._post_halo(index, below)
        x = self._assemble(index, below)
        if self.overlap:
            return x, pending
        pending.finish(x, lplan.parts[self.partition].needed[0])
        return x, None

    def _compute(self, index: int, x: np.ndarray, pending):
        """Layer `index`'s owned output from input x, finishing its halo exchange `pending`
        as late as its band order allows; returns it and the next layer's exchange when it
        started that one (band order "sent")."""
        block, order = self.layers[index], self.orders[index]
        n0 = self.plan.layers[index].parts[self.partition].needed[0]
        if order is None or order.mode == "sent":
            if pending is not None and pending.receiving:
                pending.finish(x, n0)
                pending = None
            if order is None:
                y = block.forward(x)
                if pending is not None:  # only sends left to complete
                    pending.finish(x, n0)
                return self._owned(index, y), None
        for r0, r1 in order.before:
            block.forward_rows(x, r0, r1)
        started = None
        if order.mode == "sent":
            started = self._post_halo(index + 1, block.y)
        if pending is not None:
            pending.finish(x, n0)
        for r0, r1 in order.after:
            block.forward_rows(x, r0, r1)
        return block.y, started

    def _unit_blocks(self, index: int) -> list[tuple[int, int]]:
        return [part.own_input for part in self.plan.layers[index].parts]

    def _allgather(self, index: int, below: np.ndarray) -> np.ndarray:
        n = below.shape[0]
        blocks = self._unit_blocks(index)
        n_in = blocks[-1][1]
        send = np.ascontiguousarray(below).reshape(n, -1)
        counts = [n * (b - a) for a, b in blocks]
        displs = [n * a for a, _ in blocks]
        flat = np.empty(n * n_in, np.float32)
        self.comm.Allgatherv(send, [flat, counts, displs, MPI.FLOAT])
        self.bytes_sent += 4 * send.size * (self.n_partitions - 1)
        self.bytes_received += 4 * (flat.size - send.size)
        x = self.layers[index]._buffer("gathered", (n, n_in))
        for (a, b), displ in zip(blocks, displs, strict=True):
            x[:, a:b] = flat[displ:displ + n * (b - a)].reshape(n, b - a)
        return x

    def _peer_pieces(self, index: int):
        """(pieces I receive, pieces I send) of a spatial layer's input rows, each as
        (partition, start row, stop row)."""
        lplan = self.plan.layers[index]
        p = self.partition
        receive = lplan.parts[p].halo
        send = tuple((q, a, b) for q, part in enumerate(lplan.parts) if q != p
                     for src, a, b in part.halo if src == p)
        return receive, send

    def _post(self, index: int, rows: np.ndarray, offset: int, incoming, outgoing) -> _Exchange:
        """Post the receives of the `incoming` pieces and the sends of the `outgoing` pieces
        (partition, start row, stop row) of `rows`, whose first row is row `offset`."""
        n = rows.shape[0]
        exchange = _Exchange(bool(incoming))
        for q, a, b in incoming:
            buf = np.empty((n, b - a) + rows.shape[2:], np.float32)
            exchange.requests.append(self.comm.Irecv(buf, source=q, tag=index))
            exchange.landing.append((buf, a, b))
            self.bytes_received += 4 * buf.size
        for q, a, b in outgoing:
            buf = np.ascontiguousarray(rows[:, a - offset:b - offset])
            exchange.requests.append(self.comm.Isend(buf, dest=q, tag=index))
            exchange.sending.append(buf)  # alive until the sends complete
            self.bytes_sent += 4 * buf.size
        return exchange

    def _post_halo(self, index: int, below: np.ndarray) -> _Exchange:
        """Start layer `index`'s halo exchange from the owned output of the layer below."""
        receive, send = self._peer_pieces(index)
        own = self.plan.layers[index].parts[self.partition].own_input
        return self._post(index, below, own[0], receive, send)

    def _assemble(self, index: int, below: np.ndarray) -> np.ndarray:
        """Layer `index`'s input buffer with the owned rows of the layer below in place (the
        halo rows land when the exchange finishes)."""
        part = self.plan.layers[index].parts[self.partition]
        n0, n1 = part.needed
        c0, c1 = part.own_input
        if not part.halo and (n0, n1) == (c0, c1) and below.flags.c_contiguous:
            return below
        x = self.layers[index]._buffer("assembled", (below.shape[0], n1 - n0) + below.shape[2:])
        o0, o1 = max(n0, c0), min(n1, c1)
        if o0 < o1:
            x[:, o0 - n0:o1 - n0] = below[:, o0 - c0:o1 - c0]
        return x

    # Loss ---------------------------------------------------------------------------------
    def _loss(self, labels: np.ndarray, want_grad: bool, scale: float | None = None) -> float:
        """Loss of the last forward (the sum over the replica's partitions), and with
        want_grad dL/dlogits of the owned classes in self.output.glogits."""
        out = self.output
        if self.n_partitions == 1:
            return out.loss(labels, want_grad, scale)
        z = out.y
        n = z.shape[0]
        s = (1.0 / n if n else 0.0) if scale is None else float(scale)
        c0, c1 = self.class_range
        mine = (labels >= c0) & (labels < c1)
        rows = np.flatnonzero(mine)
        cols = labels[rows] - c0
        if out.kind == "softmax":
            zmax = z.max(axis=1)
            self.comm.Allreduce(MPI.IN_PLACE, zmax, op=MPI.MAX)
            e = np.exp(z - zmax[:, None])
            # Per-example sums of exp, and (last) the summed logits of the true classes.
            sums = np.empty(n + 1, np.float64)
            e.sum(axis=1, dtype=np.float64, out=sums[:n])
            sums[n] = z[rows, cols].sum(dtype=np.float64)
            self.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
            # Counted as the plan does: one max and one sum per example from each peer.
            traffic = n * SOFTMAX_BYTES * (self.n_partitions - 1)
            self.bytes_sent += traffic
            self.bytes_received += traffic
            loss = s * (float(np.log(sums[:n]).sum() + zmax.sum(dtype=np.float64)) - sums[n])
            probs = e
            probs /= sums[:n, None].astype(np.float32)
        else:  # one-vs-all logistic: binary cross-entropy per class, no coupling
            probs = 1.0 / (1.0 + np.exp(-z))
            softplus = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
            total = np.array([softplus.sum(dtype=np.float64) - z[rows, cols].sum(dtype=np.float64)])
            self.comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
            loss = s * float(total[0])
        out.probs = probs.astype(np.float32, copy=False)
        if want_grad:
            g = out._buffer("glogits", z.shape)
            np.multiply(out.probs, np.float32(s), out=g)
            g[rows, cols] -= np.float32(s)
            out.glogits = g
        else:
            out.glogits = None
        return loss

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.forward(x)
        return self._loss(labels, want_grad=False)

    # Backward -----------------------------------------------------------------------------
    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Mean minibatch loss (the same on every partition); this partition's gradient is
        left in self.grad."""
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.forward(x)
        loss = self._loss(labels, want_grad=True)
        self._backward()
        return loss

    def _backward(self) -> None:
        g = self.output.glogits
        for index in range(len(self.layers) - 1, -1, -1):
            lplan = self.plan.layers[index]
            block = self.layers[index]
            if lplan.kind == "lcn":  # the block's halo rows get no gradient from here
                part = lplan.parts[self.partition]
                n0 = part.needed[0]
                a, b = part.owned
                full = block._buffer("gy_full", block.y.shape)
                full[:, :a - n0] = 0.0
                full[:, a - n0:b - n0] = g
                full[:, b - n0:] = 0.0
                g = full
            if not lplan.need_input_grad:
                block.backward(g, False)
                break
            if self._overlaps_return(index):
                # The halo rows of the input gradient travel while the weight gradients compute.
                gx = block.backward_input(g)
                exchange = self._post_return(index, gx)
                block.backward_params(g)
                g = self._land_return(index, gx, exchange)
            else:
                g = self._return_gradient(index, block.backward(g, True))

    def _overlaps_return(self, index: int) -> bool:
        return (self.overlap and self.plan.layers[index].input_split == "rows"
                and hasattr(self.layers[index], "backward_input"))

    def _return_gradient(self, index: int, gx: np.ndarray) -> np.ndarray:
        """dL/d(owned output of the layer below) from every partition's input gradient."""
        if self.n_partitions == 1:
            return gx
        if self.plan.layers[index].input_split == "units":
            return self._reduce_scatter(index, gx, self._below_shape(index, gx))
        return self._land_return(index, gx, self._post_return(index, gx))

    def _below_shape(self, index: int, gx: np.ndarray) -> tuple[int, ...]:
        a, b = self.plan.layers[index - 1].parts[self.partition].owned
        return (gx.shape[0], b - a) + self.layers[index - 1].output_shape[1:]

    def _reduce_scatter(self, index: int, gx: np.ndarray, shape) -> np.ndarray:
        n = gx.shape[0]
        blocks = self._unit_blocks(index)
        gx = gx.reshape(n, -1)
        send = self.layers[index]._buffer("scatter", (gx.size,))
        displ = 0
        for a, b in blocks:  # block-major: each owner's piece contiguous
            send[displ:displ + n * (b - a)].reshape(n, b - a)[...] = gx[:, a:b]
            displ += n * (b - a)
        g = self.layers[index - 1]._buffer("gy_below", shape)
        self.comm.Reduce_scatter(send, g, [n * (b - a) for a, b in blocks], op=MPI.SUM)
        self.bytes_sent += 4 * (send.size - g.size)
        self.bytes_received += 4 * g.size * (self.n_partitions - 1)
        return g

    def _post_return(self, index: int, gx: np.ndarray) -> _Exchange:
        """Start sending the halo rows' gradients back to their owners (the pieces received
        forward) and receiving those of the rows sent (to be added)."""
        receive, send = self._peer_pieces(index)
        needed = self.plan.layers[index].parts[self.partition].needed
        return self._post(index, gx, needed[0], send, receive)

    def _land_return(self, index: int, gx: np.ndarray, exchange: _Exchange) -> np.ndarray:
        """The gradient of the owned output below: gx's owned rows plus what came back."""
        part = self.plan.layers[index].parts[self.partition]
        n0, n1 = part.needed
        c0, c1 = part.own_input
        if not exchange.requests and (n0, n1) == (c0, c1):
            return gx  # the block read exactly its own rows: nothing to return or add
        g = self.layers[index - 1]._buffer("gy_below", self._below_shape(index, gx))
        o0, o1 = max(n0, c0), min(n1, c1)
        if o0 < o1:
            g[:, :o0 - c0] = 0.0
            g[:, o0 - c0:o1 - c0] = gx[:, o0 - n0:o1 - n0]
            g[:, o1 - c0:] = 0.0
        else:
            g[...] = 0.0
        exchange.finish(g, c0, add=True)
        return g

    # Prediction ---------------------------------------------------------------------------
    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class of each example (int32), the same on every partition."""
        out = np.empty(len(x), dtype=np.int32)
        for start in range(0, len(x), batch_size):
            out[start:start + batch_size] = self._argmax(self.forward(x[start:start + batch_size]))
        return out

    def _argmax(self, z: np.ndarray) -> np.ndarray:
        if self.n_partitions == 1:
            return z.argmax(axis=1).astype(np.int32)
        n = z.shape[0]
        local = z.argmax(axis=1)
        best = np.empty((self.n_partitions, n), np.float32)
        where = np.empty((self.n_partitions, n), np.int32)
        self.comm.Allgather(np.ascontiguousarray(z[np.arange(n), local]), best)
        self.comm.Allgather((local + self.class_range[0]).astype(np.int32), where)
        # Ties go to the lowest class, as argmax over the whole row does.
        return where[best.argmax(axis=0), np.arange(n)]

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        """(mean loss, accuracy) over a dataset, in batches; collective over the replica."""
        return evaluate_in_batches(self._score_batch, x, labels, batch_size)

    def _score_batch(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(loss sum, correct predictions) of one batch; collective over the replica."""
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        z = self.forward(x)
        return self._loss(labels, want_grad=False, scale=1.0), int(np.count_nonzero(self._argmax(z) == labels))


def worker_model(network: Network, comm: MPI.Intracomm, plan: PartitionPlan, overlap: bool = False):
    """What a worker rank trains: (model, its canonical parameter ranges, the input rows it
    reads or None for whole examples). The whole network when the replica has one rank
    (allocated here: the one role of a run that holds the full vector; not initialised, as
    its values come from the shards at its first fetch, before anything reads them).
    `overlap`: the partitions' halo exchanges run behind compute ([train] overlap_exchanges)."""
    if plan.n_partitions == 1:
        return network.allocate(initialise=False), [(0, network.n_params)], None
    model = PartitionedNetwork(network, comm, plan, overlap=overlap)
    rows = model.input_rows
    if rows == (0, network.input_shape[0]):
        rows = None  # a dense first layer reads whole examples
    return model, model.ranges, rows


__all__ = ["PartitionedNetwork", "worker_model"]
