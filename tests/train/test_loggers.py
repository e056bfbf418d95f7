"""A logger that fails never costs the run: a --report-to target whose calls raise (a server answering 503, a
full disk) or hang is reported once and disabled; training, checkpoints, the final evaluation and metrics.json
go on, and no logger call holds training up longer than its time limit."""

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from peftmed.train import loggers

TRAIN = ["train", "--backbone", "miss-tiny", "--recipe", "decoder=lora(r=4,kernel=torch)", "--dataset", "phantom",
         "--data-options", "n_images=6", "--batch-size", "4", "--steps", "6", "--max-new-tokens", "3",
         "--progress", "false"]


class Flaky:
    """A target that works for ``good`` calls, then raises on every call; records what reached it."""

    good = 3
    seen: list = []

    def __init__(self, log_dir, run_name, hparams, texts):
        Flaky.seen = []

    def scalars(self, step, values):
        if len(Flaky.seen) >= Flaky.good:
            raise ConnectionError("503 Service Unavailable")
        Flaky.seen.append(step)

    def close(self, final):
        raise OSError(errno.ENOSPC, "No space left on device")


class Hanging(Flaky):
    release = threading.Event()

    def scalars(self, step, values):
        Hanging.release.wait(60)


@pytest.fixture
def fake_targets(monkeypatch):
    monkeypatch.setitem(loggers.TARGET_CLASSES, "tensorboard", Flaky)
    monkeypatch.setitem(loggers.TARGET_CLASSES, "wandb", Hanging)
    monkeypatch.setattr(Hanging, "release", threading.Event())
    yield
    Hanging.release.set()


def test_a_failing_target_is_reported_once_and_disabled(fake_targets, tmp_path, caplog):
    log = loggers.Loggers("tensorboard", tmp_path, "run", {"lr": 1e-3}, timeout=5)
    with caplog.at_level(logging.WARNING, logger="peftmed.train"):
        for step in range(1, 11):
            log.scalars(step, {"train/loss": 1.0})
        log.close({"acc": 0.5})  # the close raises too: no exception reaches the caller
    assert Flaky.seen == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if "--report-to tensorboard" in r.getMessage()]
    assert len(warnings) == 1 and "logging step 4 failed: ConnectionError: 503" in warnings[0]
    assert "training goes on" in warnings[0]


def test_a_hanging_target_never_holds_training_up(fake_targets, tmp_path, caplog):
    log = loggers.Loggers("wandb", tmp_path, "run", {}, timeout=0.5)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="peftmed.train"):
        for step in range(1, 200):
            log.scalars(step, {"train/loss": 1.0})
        submitted = time.perf_counter() - t0
        log.close()
    assert submitted < 0.5  # training only queues the values
    assert time.perf_counter() - t0 < 3  # closing waits for the time limit, not for the server
    assert any("more than 0.5 s" in r.getMessage() for r in caplog.records)


def test_the_final_evaluation_and_metrics_survive_a_logger_that_fails_at_the_end(fake_targets, tmp_path, capsys):
    """A full disk under logs/ at the end used to give rc 1, no metrics.json and no final evaluation."""
    from peftmed.cli import main

    Flaky.good = 100  # every step logs; only the close fails (a full disk when TensorBoard writes its hparams)
    rc = main([*TRAIN, "--report-to", "tensorboard", "--output", str(tmp_path / "run")])
    Flaky.good = 3
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["step"] == 6 and "acc_overall" in metrics["scores"]
    assert (tmp_path / "run" / "predictions.json").is_file()
    assert Flaky.seen == [1, 2, 3, 4, 5, 6, 6]  # the steps, then the final evaluation


class _Unavailable(BaseHTTPRequestHandler):
    def _answer(self):
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"unavailable")

    do_GET = do_POST = do_PUT = do_PATCH = _answer

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_an_mlflow_server_answering_503_does_not_stop_training(tmp_path):
    pytest.importorskip("mlflow")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_port}",
               "PEFTMED_LOGGER_TIMEOUT": "5", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "peftmed", *TRAIN, "--report-to", "mlflow", "--output", "run"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        seconds = time.perf_counter() - t0
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--report-to mlflow" in r.stderr and "disabled, training goes on" in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["step"] == 6
    assert seconds < 120  # mlflow's own retries once stalled a run for 580 s
