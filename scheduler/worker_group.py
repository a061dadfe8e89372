"""A job's actors: starting them in their placement bundles, replacing and stopping them.

N model replicas (worker slots 0..N-1) and K parameter-server shards, each in its own bundle of
the job's placement group (placement.py). This is mechanism only: the group starts the actors,
kills the workers the runner tells it to remove, starts a new replica in a lost worker's
bundle when told to, and stops everything. When to do which is the failure policy's question
(failure_policy.py).

The actor classes are plain Python classes; this is the one place they become Ray actors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scheduler.placement import Placement
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.replica import ModelReplica, ReplicaSetup
from worker.training_rows import TrainingRows
from worker.transport.liveness import CONCURRENCY_GROUPS, Liveness, shard_lost
from worker.transport.step import ActorFailure, ShardLost, WorkersLost


def actor_class(cls: type) -> Any:
    """`cls` (a replica or shard class) as a Ray actor class whose heartbeats have a thread of
    their own (worker/transport/liveness.py). Without that concurrency group, Ray 2.60 ends the
    actor's process at its first heartbeat. Ray's type stubs omit ray.remote's
    concurrency_groups argument, which Ray 2.60 takes."""
    return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls)  # type: ignore[call-overload]


RemoteReplica = actor_class(ModelReplica)
RemoteShard = actor_class(ParameterServerShard)


@dataclass(frozen=True)
class Evaluation:
    """What the workers computed of the validation batches (None: a lost worker's batch), and
    the workers lost meanwhile (None: none)."""

    values: list[tuple[float, int, int] | None]
    lost: WorkersLost | None


@dataclass(frozen=True)
class ActorLocations:
    """(host identity, Ray node id) of each worker and each shard."""

    workers: list[tuple[str, str]]
    shards: list[tuple[str, str]]


class WorkerGroup:
    def __init__(self, placement: Placement, *, timeout_seconds: float):
        """The group owns `placement` from here on: stop() releases it."""
        self.placement = placement
        self.timeout_seconds = timeout_seconds
        # The heartbeats of every wait on the job's actors (the transports' too), which probe
        # the raylet of an actor whose heartbeat is late (raylet_of).
        self.liveness = Liveness(raylet_of=self.raylet_of)
        self.actor_nodes: dict[object, str] = {}  # actor handle -> its Ray node id
        self._raylets: dict[str, tuple[str, int]] = {}  # node id -> its raylet's address
        self.replicas: list = []  # by worker slot; a replacement takes its slot's place
        self.shards: list = []
        self.alive: list[int] = []  # worker slots with a serving replica, sorted
        self.starting: dict[int, ray.ObjectRef] = {}  # slot -> its replacement's readiness
        self.standby: Any = None  # a standby shard's handle, started or ready
        self.standby_started: ray.ObjectRef | None = None

    def start(self, replica_setup: ReplicaSetup, shard_setups: list[ShardSetup],
              rows: TrainingRows, x_val: np.ndarray | None = None,
              y_val: np.ndarray | None = None) -> ActorLocations:
        """Start every replica and shard, and wait until each can say where it runs. The
        training rows' source and the validation split go to the object store once (arrays
        whole, a Parquet source as where to read); every replica reads the same copy."""
        validation = ((ray.put(x_val), ray.put(y_val)) if x_val is not None and y_val is not None
                      else (None, None))
        self._replica_arguments = (replica_setup, ray.put(rows), *validation)
        self.replicas = [self._new_replica(w) for w in range(self.placement.workers)]
        self.shard_setups = shard_setups
        self.shards = [self._new_shard(k) for k in range(len(shard_setups))]
        workers = ray.get([replica.location.remote() for replica in self.replicas],
                          timeout=self.timeout_seconds)
        shards = self._shard_locations("while starting")
        for actor, (_, node) in zip(self.replicas + self.shards, workers + shards):
            self.actor_nodes[actor] = node
        self.alive = list(range(len(self.replicas)))
        return ActorLocations(workers, shards)

    def _new_replica(self, worker: int):
        return RemoteReplica.options(**self.placement.worker_options(worker),
                                     max_concurrency=2).remote(*self._replica_arguments)

    def _new_shard(self, index: int):
        # A shard's reduce may wait for the workers' chunks (object-store transport), which
        # then arrive in other threads: room for those beside the runner's occasional calls.
        return RemoteShard.options(**self.placement.shard_options(index),
                                   max_concurrency=4).remote(self.shard_setups[index])

    def owner_for(self, position: int) -> int:
        """The worker that computes the block at `position` of a list of blocks to hand out:
        round robin over the live slots in order, so block b goes to the same worker as long
        as the same workers live."""
        return self.alive[position % len(self.alive)]

    # --- workers: removed, replaced ----------------------------------------------------------

    def remove(self, workers: tuple[int, ...]) -> None:
        """Kill these workers and stop handing them blocks. ray.kill ends a process some
        milliseconds later (seconds for a stopped one): where a survivor writes the buffers
        the lost worker wrote, the transport has ended its process before handing its blocks
        over (worker/transport/worker_processes.py)."""
        for worker in workers:
            ray.kill(self.replicas[worker])
            if worker in self.alive:
                self.alive.remove(worker)

    def vacant_slots(self) -> list[int]:
        """Worker slots with neither a live replica nor one starting."""
        return [w for w in range(len(self.replicas))
                if w not in self.alive and w not in self.starting]

    def replace(self, worker: int) -> None:
        """Start a new replica in slot `worker`'s bundle (free again since its replica died);
        it joins once ready (admit_ready), the step loop never waits for it."""
        self.replicas[worker] = self._new_replica(worker)
        self.starting[worker] = self.replicas[worker].location.remote()

    def admit_ready(self) -> list[int]:
        """Slots whose replacement is ready now: live again from the next step. One that died
        starting up leaves its slot vacant."""
        admitted = []
        for worker, ready in list(self.starting.items()):
            if not ray.wait([ready], timeout=0)[0]:
                continue
            del self.starting[worker]
            try:
                _, self.actor_nodes[self.replicas[worker]] = ray.get(ready)
            except ray.exceptions.RayActorError:
                continue
            self.alive = sorted({*self.alive, worker})
            admitted.append(worker)
        return admitted

    def raylet_of(self, actor) -> tuple[str, int] | None:
        """(address, port) of the raylet of the node `actor` runs on, when known."""
        node = self.actor_nodes.get(actor)
        if node is None:
            return None
        if node not in self._raylets:  # a node seen for the first time: read the table again
            self._raylets = {entry["NodeID"]: (entry["NodeManagerAddress"],
                                               entry["NodeManagerPort"])
                             for entry in ray.nodes()}
        return self._raylets.get(node)

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, step: int, batches: list[tuple[int, int]],
                 parameters: np.ndarray | None, master_buffers: np.ndarray | None,
                 timeout_seconds: float) -> Evaluation:
        """Each validation batch's (summed loss, samples, correct), in batch order, computed
        by the live workers (batch b by owner_for(b)), waited on with heartbeats (worker/
        transport/liveness.py): a worker that dies, misses its heartbeat or stays silent past
        `timeout_seconds` is in the result's `lost` (the runner hands that to the failure
        policy) and its batches are None (the caller computes them)."""
        workers = sorted({self.owner_for(b) for b in range(len(batches))})
        assigned = {w: [b for b in range(len(batches)) if self.owner_for(b) == w]
                    for w in workers}
        shared = None if parameters is None else ray.put(parameters)
        pending = {w: self.replicas[w].evaluate_batches.remote(
            [batches[b] for b in assigned[w]], shared, master_buffers) for w in workers}
        results: list[tuple[float, int, int] | None] = [None] * len(batches)
        settled = self.liveness.settle(pending, {w: self.replicas[w] for w in pending},
                                       timeout_seconds)
        died: set[int] = set()
        for worker, call in settled.ready.items():
            try:
                values = ray.get(call)
            except ray.exceptions.RayActorError:
                died.add(worker)
                continue
            for b, value in zip(assigned[worker], values):
                results[b] = value
        lost = died | settled.unanswered | settled.silent
        return Evaluation(results, None if not lost else WorkersLost(
            step, tuple(sorted(lost)), (), tuple(sorted(settled.silent)),
            tuple(sorted(settled.unanswered)), tuple(sorted(settled.raylet_gone))))

    # --- shards: replaced, their state -------------------------------------------------------

    def kill_shards(self) -> None:
        """Kill every shard (a lost one's survivors too: they may be halfway through a step
        that is to be done again)."""
        for shard in self.shards:
            ray.kill(shard)

    # --- the standby shard: a warm spare for a lost one ---------------------------------------

    def start_standby_shard(self, node_id: str) -> None:
        """Start a standby shard on `node_id` (the shards' node), not waited for: a process
        with its imports done and a shard's arrays made, idle until promote_standby_shard.
        A replacement started when a shard is lost costs 1.5 to 3 s (a worker process's
        imports, and the wait for the killed shard's bundle to be free: measured on this
        machine); a standby costs none of that. It needs no CPU while idle, so it takes no
        bundle of the job's placement group: it asks for none (num_cpus=0), pinned to the
        node, and once promoted works as the shard whose place it took."""
        standby = self.standby = RemoteShard.options(
            num_cpus=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(self.shard_setups[0])
        self.standby_started = standby.location.remote()

    def standby_shard_ready(self) -> bool:
        """Whether a standby shard has started and can take over now. One that failed to start
        (died, or could not be placed: its node gone) is dropped, so that another can be."""
        started = self.standby_started
        if self.standby is None or started is None:
            return False
        if not ray.wait([started], timeout=0)[0]:
            return False
        try:
            _, self.actor_nodes[self.standby] = ray.get(started)
            return True
        except ray.exceptions.RayError:
            self.standby = None
            return False

    def promote_standby_shard(self, lost: int) -> None:
        """The ready standby takes shard `lost`'s place (killed already) with its setup; its
        state is loaded next (load_shard_states). ActorFailure(ShardLost) if it cannot."""
        standby, self.standby = self.standby, None
        self.shards[lost] = standby
        self.liveness.answers_or_failure(
            {lost: standby.take_over.remote(self.shard_setups[lost])}, {lost: standby},
            self.timeout_seconds, shard_lost("while the standby shard took over"))

    def kill_shard(self, index: int) -> None:
        ray.kill(self.shards[index])

    def start_shards(self) -> None:
        """New shards in the killed ones' bundles (free again once Ray has reaped them), once
        each can say where it runs; ActorFailure(ShardLost) if one cannot."""
        self.shards = [self._new_shard(k) for k in range(len(self.shard_setups))]
        locations = self._shard_locations("while replacing the shards")
        for shard, (_, node) in zip(self.shards, locations):
            self.actor_nodes[shard] = node

    def shard_states(self, when: str) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Every shard's (optimizer steps, state); ActorFailure(ShardLost) if one is dead."""
        return self._shard_calls(lambda shard: shard.state.remote(), when)

    def load_shard_states(self, optimizer_steps: int, state: dict[str, np.ndarray]) -> None:
        self._shard_calls(lambda shard: shard.load_state.remote(optimizer_steps, state),
                          "while loading a checkpoint")

    def _shard_calls(self, call, when: str) -> list:
        """One call to every (running) shard, in parallel, waited on with heartbeats (worker/
        transport/liveness.py): a shard that died, misses its heartbeat (stopped, its node
        gone: found in seconds) or stays silent past the timeout is a lost one,
        ActorFailure(ShardLost)."""
        shards = dict(enumerate(self.shards))
        return self.liveness.answers_or_failure({k: call(shard) for k, shard in shards.items()},
                                                shards, self.timeout_seconds, shard_lost(when))

    def _shard_locations(self, when: str) -> list[tuple[str, str]]:
        """Every new shard's (host identity, node id), once it has started. No heartbeats: a
        shard still starting (its process, its imports: seconds) could not answer one yet.
        Ray reports one that cannot start; the timeout bounds the rest."""
        refs = [shard.location.remote() for shard in self.shards]
        deadline = time.monotonic() + self.timeout_seconds
        locations = []
        for k, ref in enumerate(refs):
            try:
                locations.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.RayActorError as error:
                raise ActorFailure(ShardLost(k, when)) from error
            except ray.exceptions.GetTimeoutError as error:
                raise ActorFailure(ShardLost(k, f"{when} (silent past the deadline)")) from error
        return locations

    def stop(self) -> None:
        """Kill every actor and release the placement group."""
        for actor in [*self.replicas, *self.shards, *([self.standby] if self.standby else [])]:
            ray.kill(actor)
        self.placement.release()
