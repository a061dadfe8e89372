"""Which Ray nodes a drain request names, and having the queue drain or undrain them.

A request names a node by its Ray node id or by its address (every node at that IP address:
a host running several raylets is drained whole). What draining does to the jobs is the
queue's mechanism (scheduler/job_queue.py: the stop at a step boundary that a shutdown uses);
who may ask is the servicer's check (an admin).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scheduler.job_queue import JobQueue
from services.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class DrainResult:
    node_ids: list[str]
    job_ids: list[str]  # the jobs stopped to queue again elsewhere


def named_nodes(node: str, live_nodes: Iterable[dict], drained: Iterable[str] = ()) -> list[str]:
    """The ids of the nodes `node` names among `live_nodes` (ray.nodes() entries) and the
    drained ones (an undrain may name a drained node by id); NotFound naming the field."""
    node = node.strip()
    if not node:
        raise InvalidArgument("node", "give a Ray node id or a node's address")
    live = list(live_nodes)
    found = sorted({entry["NodeID"] for entry in live
                    if node in (entry["NodeID"], entry.get("NodeManagerAddress"))})
    if not found and node in set(drained):
        found = [node]
    if not found:
        addresses = sorted({entry.get("NodeManagerAddress", "") for entry in live})
        raise NotFound(f"node: no live node has the id or address {node!r} (the cluster has "
                       f"{len(live)} node(s) at {', '.join(addresses) or 'no address'})")
    return found


def drain_node(queue: JobQueue, node: str, undrain: bool,
               live_nodes: Sequence[dict]) -> DrainResult:
    node_ids = named_nodes(node, live_nodes, queue.drained_nodes() if undrain else ())
    if undrain:
        queue.undrain(node_ids)
        return DrainResult(node_ids, [])
    return DrainResult(node_ids, queue.drain(node_ids))
