"""What a GPU changes, tested on the CPU: states written on a GPU meet states written on the CPU, mixed
precision is chosen by what the card computes natively, fp16's loss scale survives a resume, parallel runs
use the GPUs the parent sees and report a child's traceback, and sizes that cannot work fail at once."""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import geometry
import runs
import utils
import warp

ROOT = Path(__file__).resolve().parents[1]


def test_a_state_written_on_a_gpu_merges_with_one_written_on_the_cpu(tmp_path, make_gpt2):
    """The crash of 02 at the end of iteration 1: a run's final state written on a GPU (a torch pickle that
    remembered cuda:0) met the CPU's init. States are now safetensors, which record no device: they load on
    the CPU whoever wrote them, tied names share one tensor again, and they merge with CPU states."""
    init = utils.state_of(make_gpt2(seed=0, tie=True))
    policies = [utils.state_of(make_gpt2(seed=s, tie=True)) for s in (1, 2)]
    for m, state in enumerate(policies):
        checkpoints.save_state(state, tmp_path / f"final{m}.safetensors")
        raw = (tmp_path / f"final{m}.safetensors").read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert "device" not in json.dumps(header) and "lm_head.weight" not in header  # stored once
    loaded = [checkpoints.load_state_file(tmp_path / f"final{m}.safetensors") for m in range(2)]
    for state, original in zip(loaded, policies, strict=True):
        assert list(state) == list(original)
        assert all(v.device.type == "cpu" and torch.equal(v, original[k]) for k, v in state.items())
        assert state["lm_head.weight"] is state["transformer.wte.weight"]
    merged = utils.slerp(init, loaded)
    assert all(torch.equal(merged[k], utils.slerp(init, policies)[k]) for k in merged)
    assert 0 < geometry.angle_summary(geometry.task_vector_angles(init, loaded))["angle/mean"] < 180


def test_state_of_copies_to_the_cpu_and_keeps_ties(make_gpt2):
    model = make_gpt2(tie=True)
    state = utils.state_of(model)
    assert all(v.device.type == "cpu" for v in state.values())
    assert state["transformer.wte.weight"] is state["lm_head.weight"]
    state["transformer.wte.weight"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(state["lm_head.weight"], model.lm_head.weight)


def test_every_state_file_is_loaded_onto_the_cpu():
    """Each torch.load in our modules says where tensors go, so no file lands on the device that wrote it."""
    for module in ("utils", "checkpoints", "runs", "warp", "evaluation", "config"):
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                assert "map_location" in {k.arg for k in node.keywords}, f"{module}.py:{node.lineno}"


def test_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """A T4 (sm_75) reports bf16 support by emulation: 'auto' must choose fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    t4 = lambda including_emulation=True: including_emulation  # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4)
    assert runs.mixed_precision_for("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert runs.mixed_precision_for("auto") == "bf16"
    assert runs.mixed_precision_for("no") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs.mixed_precision_for("auto") == "no"


def test_fp16_loss_scale_survives_a_resume(tmp_path):
    """The GradScaler's scale goes into the progress file and comes back: a resumed fp16 run continues
    with the scale it had, not the initial 65536."""
    trained = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    trained.scaler.scale(torch.ones(()))  # the first scaled loss creates the scale
    trained.scaler.update(new_scale=37.0)
    checkpoints.save_progress(tmp_path / "progress.pt", trained, step=3)
    fresh = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    state = checkpoints.load_progress(tmp_path / "progress.pt", fresh)
    assert state["step"] == 3 and fresh.scaler.get_scale() == 37.0
    assert checkpoints.load_progress(tmp_path / "missing.pt", fresh) is None


def test_children_use_the_gpus_the_parent_sees():
    assert runs.child_gpu(0, "2,3") == "2" and runs.child_gpu(1, "2, 3") == "3"
    assert runs.child_gpu(1, None) == "1" and runs.child_gpu(0, "") == "0"


def test_processes_follow_cfg_parallel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runs.processes_for(SimpleNamespace(runs=2, parallel=True)) == 2
    assert runs.processes_for(SimpleNamespace(runs=2, parallel=False)) == 1
    assert runs.processes_for(SimpleNamespace(runs=4, parallel=True)) == 2  # one run per GPU at a time
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runs.processes_for(SimpleNamespace(runs=2, parallel=True, cpu_processes=2)) == 1  # the GPU's


def test_cpu_processes_take_the_parallel_path_without_gpus(monkeypatch):
    """Without a GPU the M runs go to `cpu_processes` spawned processes (T4 x2's path, on the CPU), at most
    one per run; a value that cannot be honoured is refused when the config is made, naming the field."""
    import config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = lambda **kw: config.WarpConfig.for_preset("offline", **kw)
    assert runs.processes_for(cfg(cpu_processes=2)) == 2
    assert runs.processes_for(cfg(cpu_processes=2, runs=3)) == 2
    assert runs.processes_for(cfg()) == 1 and runs.processes_for(cfg(cpu_processes=1)) == 1
    with pytest.raises(ValueError, match=r"cpu_processes=3: must lie in \[0, runs=2\]"):
        cfg(cpu_processes=3)
    with pytest.raises(ValueError, match=r"cpu_processes=-1"):
        cfg(cpu_processes=-1)
    with pytest.raises(ValueError, match=r"cpu_processes=True: must be of type int"):
        cfg(cpu_processes=True)


def fail_in_child(n: int, device=None) -> None:
    """A job for `run_parallel` that fails in its own process."""
    if n == 1:
        raise ValueError(f"boom in job {n}")


def test_a_failed_parallel_job_reports_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)job\(s\) \[1\] failed.*ValueError: boom in job 1"):
        runs.run_parallel(fail_in_child, [(0,), (1,)], processes=2)


def sleep_in_child(seconds: float, pid_file: str, device=None) -> None:
    """A job for `run_parallel` that says which process it runs in, then sleeps."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def test_an_interrupted_parallel_run_leaves_no_child_running(tmp_path):
    """Ctrl-C in the cell (SIGINT to the parent while it waits for its children) ends both children,
    which would otherwise train on, holding their GPUs, with no cell left to stop them."""
    import signal
    import threading

    import psutil

    pid_files, children = [tmp_path / f"job{j}.pid" for j in range(2)], []

    def interrupt_once_both_run():
        deadline = time.monotonic() + 120
        while not all(f.exists() and f.read_text() for f in pid_files) and time.monotonic() < deadline:
            time.sleep(0.05)
        children.extend(psutil.Process(int(f.read_text())) for f in pid_files)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C (a notebook's interrupt) sends the kernel

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            runs.run_parallel(sleep_in_child, [(300.0, str(f)) for f in pid_files], processes=2)
        assert len(children) == 2  # both had started when the interrupt came
        alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"children {alive} still run"
    finally:  # a failing run leaves none behind for the next tests either
        for child in children:
            if child.is_running():  # the same process (psutil checks its start time), not a reused pid
                child.kill()


def test_too_few_prompts_fail_at_once_with_what_to_change(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="fewer than one micro-batch of 4"):
        warp.prompt_batches(3, 4, seed=0)
    assert len(next(warp.prompt_batches(4, 4, seed=0))) == 4
    # train_run refuses before loading a model
    monkeypatch.setattr(runs, "load_rl_models", lambda *a: pytest.fail("loaded models"))
    cfg = SimpleNamespace(baseline="none", rloo_k=2, batch_size=8, save_every=1, mixed_precision="no")
    spec = runs.RunSpec(str(tmp_path / "run"), str(tmp_path / "init.safetensors"), seed=0, steps=1)
    with pytest.raises(ValueError, match="2 prompt"):
        warp.train_run(cfg, spec, [[1, 2], [3, 4]])


def test_02_and_04_check_on_the_device_they_train_on():
    """02's own checks and 03/04's evaluation move every model they load to `device`."""
    import re

    for notebook in ("02_warp_training.ipynb", "03_generation_eval.ipynb", "04_mu_sweep.ipynb"):
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for line in code.splitlines():
            load = re.match(r"\s*(\w+)(, \w+)? = utils\.load_(policy|reward_model)\(", line)
            if load and ".to(device)" not in line:
                assert f"{load.group(1)}.to(device)" in code, (notebook, line)


def test_gpu_check_takes_shared_files_else_the_hub_else_stops(tmp_path, monkeypatch):
    """bench/gpu_check.py runs on Kaggle/Colab without ../shared: it uses the imdb preset's Hub models
    and data when the Hub answers, and says what is missing when neither is there."""
    from bench import gpu_check, imdb_shaped

    shared = tmp_path / "shared"
    for f in ("gpt2_tokenizer/encoder.json", "gpt2_tokenizer/vocab.bpe", "imdb_train_4k.jsonl"):
        (shared / f).parent.mkdir(parents=True, exist_ok=True)
        (shared / f).write_text("")
    absent = tmp_path / "absent"
    assert gpu_check.choose_source(shared, hub_reachable=lambda: True) == "shared"  # no download needed
    assert gpu_check.choose_source(shared, hub_reachable=lambda: False) == "shared"
    assert gpu_check.choose_source(absent, hub_reachable=lambda: True) == "hub"
    assert gpu_check.choose_source(shared, "hub", hub_reachable=lambda: False) == "hub"  # asked for
    with pytest.raises(SystemExit, match=r"--source shared: shared IMDb/GPT-2 assets not found"):
        gpu_check.choose_source(absent, "shared", hub_reachable=lambda: True)
    with pytest.raises(SystemExit) as neither:
        gpu_check.choose_source(absent, hub_reachable=lambda: False)
    message = str(neither.value)
    assert "not found" in message and "--shared" in message and "lvwerra/gpt2-imdb" in message
    assert "Settings -> Internet -> on" in message

    # main: the source chosen is the one the notebooks run on; the Hub is offline in tests
    ran = []
    monkeypatch.setattr(gpu_check, "run_check", lambda out, sizes, shared, source: ran.append(source) or {})
    monkeypatch.setattr(gpu_check, "table", lambda result: "")
    gpu_check.main(["--smoke", "--out", str(tmp_path / "out"), "--shared", str(shared)])
    assert ran == ["shared"]
    with pytest.raises(SystemExit, match="Hugging Face Hub does not answer"):
        gpu_check.main(["--smoke", "--out", str(tmp_path / "out"), "--shared", str(absent)])
    assert imdb_shaped.missing_shared(absent) is not None and ran == ["shared"]
