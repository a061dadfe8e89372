import multiprocessing

import numpy as np

from worker.shared_memory import SharedArrayGroup, host_identity


def _write_in_child(spec, value):
    spec.attach()[:] = value


def test_an_array_written_in_another_process_is_seen_without_copying():
    group = SharedArrayGroup("test")
    try:
        spec = group.create("params", (1000,), "float32")
        mine = spec.attach()
        child = multiprocessing.get_context("spawn").Process(target=_write_in_child,
                                                              args=(spec, 3.5))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert np.all(mine == 3.5)
    finally:
        group.remove()
    assert not group.directory.exists()


def test_host_identity_is_stable_within_a_host():
    assert host_identity() == host_identity() and "/" in host_identity()
