"""dbmpi.runtime.portion_channel and dbmpi.ps.commands on two ranks (a small script under
mpiexec): each message arrives with the tag, sender and contents Sandblaster expects (the
fixed-size requests in the order sent, through fewer posted receives than requests), and
the shard commands are encoded as dbmpi.ps.vectors decodes them."""
import subprocess
import sys
import textwrap

from tests.test_downpour import mpiexec

SCRIPT = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI
    from dbmpi.algorithms.portions import (DISMISSED, REPLY_FIELDS, REQUEST_FIELDS, STOPPED, Order, Reply,
                                           decode_request, encode_request)
    from dbmpi.ps.commands import ShardCommands
    from dbmpi.ps.vectors import AXPY, DOT
    from dbmpi.runtime.comm import Tag
    from dbmpi.runtime.portion_channel import CoordinatorChannel, PartitionRelay, RankChannel

    world = MPI.COMM_WORLD
    if world.rank == 0:  # the coordinator's end
        ranks = CoordinatorChannel(world, REQUEST_FIELDS, REPLY_FIELDS, ring=2)
        got = []
        while len(got) < 3:  # more requests than posted receives, taken in the order sent
            if (found := ranks.request()) is not None:
                got.append((found[0], decode_request(found[1])))
        assert got[0] == (1, {"replica": 0, "evaluation": 2, "done": 3, "flushed": None, "signal": False}), got
        assert got[1][1]["flushed"] == {"portions": 4, "loss": 0.125, "nonfinite": 1} and got[1][1]["done"] is None
        assert got[2][1]["signal"] is True and got[2][1]["evaluation"] == 5
        assert ranks.receive(Tag.REQUEST) is None  # no request is left for a probe
        ranks.reply(1, Order.of(Reply(commit=True, portion=(4, 40, 50)), evaluation=2, n=100))
        ranks.reply(1, Order.stopped())
        ranks.reply_unwaited(1, Order.stopped(DISMISSED))
        assert len(ranks.unwaited) == 1
        while (found := ranks.receive(Tag.RESULT, source=1)) is None:
            pass
        assert found == (1, (0.5, 0.9)), found
        while (found := ranks.receive(Tag.RECORDS)) is None:
            pass
        assert found == (1, {"rank": 1, "records": []}), found
        ranks.verdict(1, True)
        ranks.close()
    else:  # a replica lead's end
        coordinator = RankChannel(world, 0)
        request, reply = np.zeros(REQUEST_FIELDS, np.int64), np.zeros(REPLY_FIELDS, np.int64)
        world.Send(encode_request(request, 0, 2, 3, None, False), dest=0, tag=Tag.REQUEST)
        flushed = {"portions": 4, "loss": 0.125, "nonfinite": 1}
        world.Send(encode_request(request, 0, 2, None, flushed, False), dest=0, tag=Tag.REQUEST)
        order = Order(*coordinator.ask(encode_request(request, 0, 5, None, None, True), reply).tolist())
        assert order == (0, 0, 1, 0, 4, 40, 50, 2, 100, 0), order
        world.Recv(reply, source=0, tag=Tag.REPLY)
        assert reply[0] == STOPPED
        world.Recv(reply, source=0, tag=Tag.REPLY)
        assert reply[0] == DISMISSED
        coordinator.send_result((0.5, 0.9))
        coordinator.send_records({"rank": 1, "records": []})
        assert coordinator.verdict() is True

    relay = PartitionRelay(world)  # partition 0 (the lead) and partition 1
    reply = np.arange(10, dtype=np.int64) if world.rank == 0 else np.zeros(10, np.int64)
    relay.share(reply)
    assert reply.tolist() == list(range(10))
    assert relay.any_signalled(world.rank == 1) and not relay.any_signalled(False)

    if world.rank == 1:  # the coordinator: the last rank of `control`
        shards = ShardCommands(world, ["x", "g", "d"])
        assert shards.n_shards == 1
        shards.send(AXPY, 0.5, "d", "x")
        shards.send(DOT, 0.0, "g", "g")
        assert shards.total() == 2.5
        shards.share({"vectors": [("params", "x")]})
        shards.wake()
    else:  # a shard's side, as dbmpi.ps.vectors.ShardVectors.serve reads it
        command = np.zeros(5)
        world.Bcast(command, root=1)
        assert command.tolist() == [AXPY, 0.5, 2, 0, -1]
        world.Bcast(command, root=1)
        assert command.tolist() == [DOT, 0.0, 1, 1, -1]
        world.Reduce(np.array([2.5]), None, op=MPI.SUM, root=1)
        assert world.bcast(None, root=1) == {"vectors": [("params", "x")]}
        world.Recv(np.zeros(1), source=1, tag=Tag.WAKE)
    print("ok", flush=True)
""")


def test_the_channels_and_shard_commands_on_two_ranks():
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # Both ranks got through every check; mpiexec may interleave their lines ("okok\n\n").
    assert done.stdout.count("ok") == 2, done.stdout
