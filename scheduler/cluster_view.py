"""What the cluster holds: each live node's CPUs and memory, for the scheduling policy.

The queue asks a view for the nodes' sizes (a poll a second, so nodes that join or leave are
seen at once) and subtracts what its own running jobs have reserved; the policy then places
bundles on what is left. Tests of the queue's policy pass a `FixedNodes` view and need no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import ray

from scheduler.scheduling_policy import Node, RunningJob


class ClusterView(Protocol):
    def nodes(self) -> list[Node]:
        """Each live node with its total (not free) CPUs and memory."""
        ...


class RayNodes:
    """The live nodes of the Ray cluster this process is connected to."""

    def nodes(self) -> list[Node]:
        return [Node(node["NodeID"], float(node["Resources"].get("CPU", 0.0)),
                     int(node["Resources"].get("memory", 0)))
                for node in ray.nodes() if node.get("Alive")]


class FixedNodes:
    """Nodes of given sizes, changed by the caller (tests: nodes joining and leaving)."""

    def __init__(self, nodes: Sequence[Node]):
        self.sized = list(nodes)

    def nodes(self) -> list[Node]:
        return [Node(node.node_id, node.cpus, node.memory_bytes) for node in self.sized]


def free_nodes(capacity: Sequence[Node], running: Iterable[RunningJob]) -> list[Node]:
    """The nodes less what the running jobs reserved on them. A job placed on a node that has
    left reserves nothing (its actors went with the node)."""
    free = {node.node_id: Node(node.node_id, node.cpus, node.memory_bytes) for node in capacity}
    for job in running:
        for bundle, node_id in zip(job.demand.bundles, job.placement, strict=True):
            if node_id in free:
                free[node_id].take(bundle)
    return list(free.values())
