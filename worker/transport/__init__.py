"""How one synchronous step travels between the runner, the replicas and the shards.

One module per transport, each owning both ends of its protocol: shared_memory.py (every actor
on the runner's host) and object_store.py (actors on other hosts). step.py says what a step asks
of a transport and what it gets back: an outcome or a failure, never a decision about one.
"""
