"""A worker the suite SIGKILLs leaves no /tmp/inventory-metrics-* folder behind: killed, the
supervisor cannot remove the metrics folder it makes itself, so WorkerProcess gives it one of
its own and removes it."""

import tempfile

from ..support import WorkerProcess, delete_topology, free_port, with_own_queues


def test_a_killed_worker_leaves_no_temporary_folder(settings, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"  # the temporary folder of this test and of the worker it starts
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    s = with_own_queues(settings, "tmpfiles")
    s = s.model_copy(update={"http": s.http.model_copy(update={"port": free_port()})})
    w = WorkerProcess(s, processes=1)
    try:
        w.start(timeout=60)
        assert list(scratch.iterdir()), "the worker's metrics folder is not in the test's temporary folder"
    finally:
        w.kill()
        delete_topology(s)
    assert not list(scratch.iterdir())
