"""gpt2-finetune.py --strategy: MirroredStrategy over 2 logical CPU devices, MultiWorkerMirroredStrategy over 2
local worker processes (TF_CONFIG on 127.0.0.1), a lost worker, and TF_CONFIG errors.

Tolerances: a replica sums its share of the gradients and the shares are summed across replicas, so the
order of float32 additions differs from one device's; the losses agree within rtol 1e-5 (mirrored, in
process) and to the 4 decimals the tool prints (multi-worker)."""
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT

FINETUNE = str(ROOT / "gpt2-finetune.py")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


MIRRORED = textwrap.dedent("""
    import sys, json
    import numpy as np
    import model
    tf = model.import_tf()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tasks import train as T
    tiny, run = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20573, (8, 32)).astype(np.int32)
    lens = rng.integers(10, 33, 8).astype(np.int32)
    batches = [(ids, lens)] * 4  # one batch again and again: the loss falls

    def trainer(strategy, optim="adam"):
        with strategy.scope() if strategy else __import__("contextlib").nullcontext():
            m = model.load(tiny)
            return T.Trainer(m, optim=optim, learning_rate=1e-3, accumulate=2, strategy=strategy)

    one = trainer(None)
    single = [one.train_step(*b) for b in batches]
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    two = trainer(mirrored)
    assert type(two.model.variables["model/wte"]).__name__ == "MirroredVariable"
    replicas = [two.train_step(*b) for b in batches[:2]]
    T.save_run(two, run, 2)  # resumed on one device: the same run
    back = T.Trainer(model.load(run), optim="adam", learning_rate=1e-3, accumulate=2)
    assert T.restore_optimizer(back, run, 2)
    replicas += [back.train_step(*b) for b in batches[2:]]
    print(json.dumps({"single": single, "mirrored": replicas, "replicas": mirrored.num_replicas_in_sync}))
""")


def test_mirrored_over_two_cpu_devices_is_the_one_device_run(tiny_model_dir, tmp_path, env):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED, encoding="utf-8")
    r = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "run")], capture_output=True,
                       text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    np.testing.assert_allclose(out["mirrored"], out["single"], rtol=1e-5)
    assert out["single"][-1] < out["single"][0]
    assert sorted(p.name for p in (tmp_path / "run").glob("model-*.index")) == ["model-2.index"]


def _losses(stdout):
    return [float(x) for x in re.findall(r"^step \d+: loss (\S+)", stdout, re.M)]


def _workers(tiny_model_dir, text, cwd, env, extra):
    ports = _free_ports(2)
    args = [sys.executable, FINETUNE, "--model", str(tiny_model_dir), "--dataset", str(text), "--run_name", "r",
            "--chunk", "64", "--batch_size", "4", "--seed", "1", "--learning_rate", "1e-3",
            "--strategy", "multiworker", "--worker_timeout", "30", *extra]
    return [subprocess.Popen(args, cwd=cwd, env={**env, "TF_CONFIG": _tf_config(ports, i)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout=240):
    out = []
    try:
        for p in procs:
            out.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.fixture
def text_file(tmp_path, corpus_lines):
    path = tmp_path / "a.txt"
    path.write_text("\n".join(corpus_lines[:300]), encoding="utf-8")
    return path


def test_two_workers_train_as_one_device_the_chief_saves_and_a_killed_worker_is_one_line(
        tiny_model_dir, text_file, tmp_path, env):
    """Two workers run the same command: their step-3 loss is the one-device run's, only the chief
    saves; then worker 1 is killed: the chief ends with one line, its last checkpoint intact."""
    many, one = tmp_path / "many", tmp_path / "one"
    many.mkdir()
    one.mkdir()
    procs = _workers(tiny_model_dir, text_file, many, env, ["--max_steps", "100000", "--save_every", "3"])
    run = many / "checkpoint" / "r"
    try:
        single = subprocess.run([sys.executable, FINETUNE, "--model", str(tiny_model_dir), "--dataset", str(text_file),
                                 "--run_name", "r", "--chunk", "64", "--batch_size", "4", "--seed", "1",
                                 "--learning_rate", "1e-3", "--max_steps", "3", "--save_every", "3"],
                                cwd=one, env=env, capture_output=True, text=True, timeout=240)
        assert single.returncode == 0, single.stderr
        deadline = time.monotonic() + 240
        while not (run / "counter").is_file() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # wait until the chief has saved a first checkpoint
        assert procs[0].poll() is None and procs[1].poll() is None
        procs[1].send_signal(signal.SIGKILL)
    finally:
        (out0, err0), (out1, err1) = _finish(procs, timeout=180)
    assert "multiworker: 2 replicas" in err0 and "the chief writes the checkpoints" in err1
    assert "saved" in err0 and "saved" not in err1
    want = _losses(single.stdout)
    assert len(want) == 1 and _losses(out0)[:1] == want and _losses(out1)[:1] == want
    # the killed worker: one line, the chief's last checkpoint kept
    assert procs[0].returncode == 2, err0[-3000:]
    lines = [line for line in err0.splitlines() if "error:" in line]
    assert len(lines) == 1 and "a worker was lost or cannot be reached" in lines[0], err0[-3000:]
    assert "Traceback" not in err0
    from tasks import train as T
    import model
    step = T.latest_step(run)
    assert step >= 3 and step % 3 == 0
    assert model.load(run).path.endswith(f"model-{step}")
    if step == 3:
        ids = [[1, 2, 3, 4, 5]]
        np.testing.assert_allclose(model.load(run).logits(ids), model.load(one / "checkpoint" / "r").logits(ids),
                                   atol=1e-5)


def test_tf_config_errors_are_one_line(tiny_model_dir, text_file, tmp_path, env):
    from model import ModelError
    from tasks import train as T
    for text, message in [("", "needs TF_CONFIG"), ("{bad", "not valid JSON"),
                          ('{"cluster": {}}', 'no "cluster" with a "worker" list'),
                          ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
                           "host:port"),
                          ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', '"task"')]:
        with pytest.raises(ModelError, match=message):
            T.parse_tf_config(text)
    assert T.parse_tf_config(_tf_config([1, 2], 1))["task"]["index"] == 1
    r = subprocess.run([sys.executable, FINETUNE, "--model", str(tiny_model_dir), "--dataset", str(text_file),
                        "--strategy", "multiworker", "--seed", "1"], cwd=tmp_path,
                       env={**env, "TF_CONFIG": "{bad"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TF_CONFIG is not valid JSON" in r.stderr and r.stderr.count("\n") == 1, r.stderr
