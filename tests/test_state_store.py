"""Node-local teacher states (``olss_dist.distributed.state_store``) survive what a killed job leaves behind."""

import numpy as np
import torch

from olss_dist.distributed.state_store import TeacherStateStore


def test_a_partial_write_of_a_killed_job_does_not_break_the_rerun(tmp_path):
    """A job killed while writing a state leaves ``.<node>.<pid>.npy``; the rerun's ``restrict`` removes it with
    the other nodes it does not keep, and reads back the finished states (the resumed job failed on
    ``int('.214.3020')`` before)."""
    store = TeacherStateStore("disk", run_key="r", root=str(tmp_path))
    states = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    store.keep("shard-0", states, [0, 214, 500])
    partial = store._shard_dir("shard-0") / ".214.3020.npy"
    np.save(partial, np.zeros(3))
    rerun = TeacherStateStore("disk", run_key="r", root=str(tmp_path))
    rerun.restrict("shard-0", [0, 214])
    assert not partial.exists() and not rerun.has("shard-0", [500]) and rerun.has("shard-0", [0, 214])
    assert torch.equal(rerun.read("shard-0", 214), states[:, 1])
