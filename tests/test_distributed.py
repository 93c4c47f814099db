"""2 CPU processes (gloo, one thread each, dropout 0) match 1 process: the same global batch trains alike, and
evaluation by generation splits the rows and gathers them into the same metrics."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).with_name("distributed_train.py")


def _launch(tmp_path, processes, per_device_batch):
    output = tmp_path / f"losses_{processes}.json"
    # `--multi_gpu` is accelerate's multi-process DDP launcher; with use_cpu it runs gloo on CPU processes
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *mode,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    command += [str(SCRIPT), str(output), str(per_device_batch)]
    with socket.socket() as probe:  # a free port, so parallel runs never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command[3:3] = ["--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text())


def test_two_processes_match_one(tmp_path):
    single = _launch(tmp_path, 1, 4)
    double = _launch(tmp_path, 2, 2)
    assert (single["world_size"], double["world_size"]) == (1, 2)
    assert single["eval"]["eval_n_eval_rec"] + single["eval"]["eval_n_eval_res"] == 9  # every row, once
    assert (single["eval_rows_per_process"], double["eval_rows_per_process"]) == ([9], [5, 4])
    assert set(single["eval"]) == set(double["eval"]) and "eval_rec_miou" in single["eval"]
    for key, value in single["eval"].items():  # the gathered rows give the one-process metrics
        assert abs(value - double["eval"][key]) < 1e-6, (key, value, double["eval"][key])
    single, double = single["logs"], double["logs"]
    assert len(single) == len(double) == 3
    for one, two in zip(single, double):
        for key, value in one.items():
            assert abs(value - two[key]) < 1e-4, (key, value, two[key])
