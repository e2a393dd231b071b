"""Training on several workers (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``): only the
chief writes the run directory, the others write a temporary copy they remove, and two
worker processes train what one process with two replicas trains."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
from helpers import ROOT, snapshot
from multi_worker_run import run_and_capture, small_config
from test_pipeline import tiny_net

from metamix_tf import pipeline
from metamix_tf.training import distribute

HERE = os.path.dirname(os.path.abspath(__file__))


class Interrupt(Exception):
    pass


def test_a_worker_other_than_the_chief_resumes_from_the_run_directory_and_writes_none(
        tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    config = small_config(str(shared))
    config.pretrain.epochs = 2

    def stop(phase, epoch, record):
        raise Interrupt(phase)

    with pytest.raises(Interrupt):  # the chief stops after the first epoch
        pipeline.run(config, "pretrain", model_fn=tiny_net, verbose=False, on_epoch_end=stop)
    before = snapshot(shared)
    assert "ckpt/pretrain/checkpoint" in before
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(distribute, "is_chief", lambda strategy: False)
    epochs = []
    keras.utils.clear_session()
    summary = pipeline.run(config, "pretrain", model_fn=tiny_net, verbose=False,
                           on_epoch_end=lambda phase, epoch, record: epochs.append(epoch))
    assert epochs == [1]  # resumed from the chief's checkpoint of epoch 1
    assert summary["phases"]["pretrain"]["epochs"] == 2
    assert snapshot(shared) == before
    assert os.listdir(scratch) == []  # its copy is removed


def _free_ports(count: int) -> list:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow  # two TensorFlow processes beside this one: 2-8 min on 2 cores
def test_two_workers_train_what_one_process_with_two_replicas_trains(tmp_path,
                                                                     two_cpu_strategy):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    shared = tmp_path / "shared"
    procs = []
    for index in range(2):
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir()
        env = {**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(scratch),
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multi_worker_run.py"), str(shared),
             str(tmp_path / f"worker{index}")], env=env, cwd=tmp_path, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    # meanwhile, the reference: one process, two replicas, the same global batch
    summary, reference = run_and_capture(str(tmp_path / "single"), strategy=two_cpu_strategy)
    for proc in procs:
        output, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, output[-3000:]

    workers = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    summaries = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert summaries[0]["machine"]["strategy"].endswith("with 2 replica(s)")
    assert summaries[0]["final_val_acc"] == summaries[1]["final_val_acc"]
    assert workers[0].keys() == workers[1].keys() == reference.keys()
    for key, value in reference.items():
        # mirrored variables: the workers hold the same values
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
        # Two workers compute the same two halves of each global batch as two local replicas
        # and add the same two numbers (a + b == b + a in floats): equal here to the last
        # bit. The tolerance only leaves room for kernels that split work by thread count.
        # (Against one device, the float phase agrees to ~1e-6, but a summation-order
        # difference can move an LSQ value across a rounding boundary, which Adam's first
        # steps turn into learning-rate-sized differences; issue 9 item 1.)
        np.testing.assert_allclose(workers[0][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    bits = json.loads((shared / "bits.json").read_text())["bits"]
    assert bits == json.loads((tmp_path / "single" / "bits.json").read_text())["bits"]
    assert summaries[0]["final_val_acc"] == pytest.approx(summary["final_val_acc"], abs=1e-6)
    # only the chief wrote the run directory; the other worker's copy is gone
    assert sorted(os.listdir(shared)) == sorted(os.listdir(tmp_path / "single"))
    assert os.listdir(tmp_path / "tmp0") == os.listdir(tmp_path / "tmp1") == []
