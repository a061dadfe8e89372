"""How one synchronous step travels between the runner, the replicas and the shards.

One module per transport, each owning both ends of its protocol: shared_memory.py (every actor
on the runner's host), direct.py (actors on other hosts: TCP connections between workers and
shards, over socket_link.py), object_store.py (the same step through Ray's object store, which
direct.py extends) and compressed.py (compressed gradients, through the object store). step.py
says what a step asks of a transport and what it gets back: an outcome or a failure, never a
decision about one.
"""
