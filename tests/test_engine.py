"""The training engine under faults: exact resume after SIGKILL, SIGTERM, a kill during a save, NaN, mismatched
resume, DDP and FSDP equivalence (2 CPU processes over gloo), held-out evaluation and offline swanlab.

Every run is the real train_pretrain.py in a subprocess, on a tiny model (hidden 64, 2 layers) and the tiny
embedded dataset, so a test costs a few seconds of process start-up and well under a second of training.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "32", "--log_interval", "100",
        "--num_threads", "1"]
STEPS = 12


def engine_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def engine_args(data: str, out: Path, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "train_pretrain.py"), "--data_path", data, "--out_dir", str(out),
            "--batch_size", "4", "--max_steps", str(STEPS), *TINY, *map(str, extra)]


def engine_run(data: str, out: Path, *extra, env: dict | None = None, timeout: int = 180):
    return subprocess.run(engine_args(data, out, *extra), cwd=ROOT, env=engine_env(env), capture_output=True,
                          text=True, timeout=timeout)


class Started:
    """A training process started in the background; its output goes to files (a full pipe would block it)."""

    def __init__(self, data: str, out: Path, *extra, env: dict | None = None):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.log = out.parent / f"{out.name}-{time.time_ns()}"
        self.stdout, self.stderr = open(f"{self.log}.out", "w"), open(f"{self.log}.err", "w")
        self.proc = subprocess.Popen(engine_args(data, out, *extra), cwd=ROOT, env=engine_env(env),
                                     stdout=self.stdout, stderr=self.stderr)

    def wait_for(self, predicate, timeout: float = 120.0) -> None:
        """Poll until predicate() holds; fail if the process ends first."""
        t0 = time.time()
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"process ended (rc {self.proc.returncode}) before the awaited state:\n"
                            f"{self.output()}\n{Path(f'{self.log}.err').read_text()}")
            if time.time() - t0 > timeout:
                self.proc.kill()
                pytest.fail("timed out waiting for the training process")
            time.sleep(0.01)

    def signal(self, sig) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=120)
        self.stdout.close(), self.stderr.close()
        return rc

    def output(self) -> str:
        return Path(f"{self.log}.out").read_text()


def resumed_step(stdout: str) -> int:
    """The step a --from_resume run said it continues from."""
    return int(stdout.split("resume: ")[1].split("(step ")[1].split(",")[0])


def weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def assert_identical(a: Path, b: Path) -> None:
    """Bit-identical model files (and, for a readable failure, tensor by tensor)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs: max |diff| {(wa[k] - wb[k]).abs().max().item()}"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def last_tokens(out: Path) -> int:
    """metrics.jsonl's `tokens` on the last training-loss line: input positions trained on since step 0."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m for m in lines if "tokens" in m][-1]["tokens"]


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def corpus(tiny_data) -> str:
    return tiny_data["pretrain"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run with no checkpoints at all: what every interrupted run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("engine") / "reference"
    r = engine_run(corpus, out)
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_two_points_then_resume_is_bit_identical(corpus, reference, tmp_path):
    out = tmp_path / "run"
    # Kill 1: SIGKILL as soon as the step-2 checkpoint exists (the process is somewhere in step 3 or later).
    run = Started(corpus, out, "--save_interval", "2")
    run.wait_for(lambda: ckpt(out, 2).is_dir())
    assert run.signal(signal.SIGKILL) == -signal.SIGKILL and not (out / "model.safetensors").exists()
    # Kill 2: the resumed run is itself killed later on, once step 8 is saved.
    run = Started(corpus, out, "--save_interval", "2", "--from_resume", "1")
    run.wait_for(lambda: ckpt(out, 8).is_dir())
    assert run.signal(signal.SIGKILL) == -signal.SIGKILL and not (out / "model.safetensors").exists()
    assert 2 <= resumed_step(run.output()) < 8
    # Finish.
    r = engine_run(corpus, out, "--save_interval", "2", "--from_resume", "1")
    assert r.returncode == 0, r.stderr
    assert 8 <= resumed_step(r.stdout) < STEPS
    assert_identical(out, reference)
    # Only the newest --keep_checkpoints (2) remain, and each is a loadable model directory.
    from minimind.checkpoint import load_model
    from minimind.resume import list_checkpoints
    kept = list_checkpoints(str(out))
    assert len(kept) == 2
    assert load_model(kept[-1]).config.hidden_size == 64


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(corpus, reference, tmp_path):
    out = tmp_path / "run"
    run = Started(corpus, out, "--save_interval", "3")
    run.wait_for(lambda: ckpt(out, 3).is_dir())
    assert run.signal(signal.SIGTERM) == 0
    stdout = run.output()
    assert "stopped by SIGTERM after step" in stdout
    stopped_at = int(stdout.split("stopped by SIGTERM after step ")[1].split("/")[0])
    assert ckpt(out, stopped_at).is_dir() and not (out / "model.safetensors").exists()
    if stopped_at < STEPS:
        r = engine_run(corpus, out, "--save_interval", "3", "--from_resume", "1")
        assert r.returncode == 0, r.stderr
        assert resumed_step(r.stdout) == stopped_at
        assert_identical(out, reference)
        # the token count rides in trainer_state.json: the resumed run goes on counting, it does not restart at 0
        assert last_tokens(out) == last_tokens(reference) > 0


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_one(corpus, reference, tmp_path):
    from minimind.checkpoint import load_model
    from minimind.resume import list_checkpoints, load_training_checkpoint
    out = tmp_path / "run"
    # The test hook makes the writer of checkpoint 4 sleep inside its temp dir, before the rename.
    run = Started(corpus, out, "--save_interval", "2", env={"MINIMIND_DEBUG_SAVE_STALL": "4:120"})
    run.wait_for(lambda: glob.glob(str(out / "checkpoints" / ".step_000004.tmp-*" / "trainer_state.json")))
    run.signal(signal.SIGKILL)
    assert not ckpt(out, 4).exists()
    assert [Path(p).name for p in list_checkpoints(str(out))] == ["step_000002"]
    assert load_training_checkpoint(str(ckpt(out, 2)))["state"]["step"] == 2
    model = load_model(str(ckpt(out, 2)))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Resuming cleans the half-written temp dir, continues from step 2 and still ends bit-identical.
    r = engine_run(corpus, out, "--save_interval", "2", "--from_resume", "1")
    assert r.returncode == 0, r.stderr
    assert resumed_step(r.stdout) == 2
    assert not glob.glob(str(out / "checkpoints" / ".step_*"))
    assert_identical(out, reference)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: NaN, a checkpoint of another run, an earlier run in the way
# ---------------------------------------------------------------------------------------------------------------
def test_nan_stops_with_one_line_and_saves_nothing_bad(corpus, tmp_path):
    from minimind.checkpoint import load_model
    from minimind.resume import list_checkpoints
    out = tmp_path / "run"
    r = engine_run(corpus, out, "--save_interval", "2", "--debug_nan_at_step", "5")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "non-finite" in errors[0] and "at step 5" in errors[0] and "step_000004" in errors[0]
    # Steps 0-4 were fine and saved; step 5 went NaN: no checkpoint after it, and no final model.
    assert [Path(p).name for p in list_checkpoints(str(out))] == ["step_000002", "step_000004"]
    assert not (out / "model.safetensors").exists()
    model = load_model(str(ckpt(out, 4)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mismatched_resume_is_refused(corpus, tmp_path, tokenizer):
    out = tmp_path / "run"
    r = engine_run(corpus, out, "--save_interval", "1", "--max_steps", "2")
    assert r.returncode == 0, r.stderr
    # A different model size: one line naming the field.
    r = engine_run(corpus, out, "--from_resume", "1", "--hidden_size", "96")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "model config differs (hidden_size: 64 in the checkpoint, 96 now)" in r.stderr
    # A fresh run into a directory holding another run's checkpoints is refused too (use --from_resume 1).
    r = engine_run(corpus, out)
    assert r.returncode == 2 and "--from_resume 1" in r.stderr.strip().splitlines()[-1]

    # Tokenizer and data are compared too (in-process: the same check the scripts run).
    from minimind.errors import CheckpointError
    from minimind.resume import check_fingerprint, list_checkpoints, load_training_checkpoint
    path = list_checkpoints(str(out))[-1]
    saved = load_training_checkpoint(path)["state"]["fingerprint"]
    check_fingerprint(saved, json.loads(json.dumps(saved)), path)  # identical: accepted
    for key, value, words in [("tokenizer", "0" * 16, "the tokenizer differs"),
                              ("data", {**saved["data"], "size": saved["data"]["size"] + 1},
                               "the data file differs (size:"),
                              ("train_samples", saved["train_samples"] - 1, "number of training samples")]:
        with pytest.raises(CheckpointError, match=None) as e:
            check_fingerprint(saved, {**saved, key: value}, path)
        assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Several processes: DDP and FSDP over gloo on the CPU
# ---------------------------------------------------------------------------------------------------------------
def torchrun(corpus: str, out: Path, *extra, nproc: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000)] + engine_args(corpus, out, *extra)[1:]
    return subprocess.run(cmd, cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=300)


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def single_fp32(corpus, tmp_path_factory) -> Path:
    """One process, global batch 8 = micro-batch 2 x 4 accumulation steps, fp32."""
    out = tmp_path_factory.mktemp("engine") / "single"
    r = engine_run(corpus, out, "--dtype", "float32", "--batch_size", "2", "--accumulation_steps", "4",
                   "--max_steps", "6")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_and_resume_on_one(corpus, single_fp32, tmp_path):
    # 2 ranks x micro-batch 2 x 2 accumulation steps = the same 8 samples per step as the single process, in
    # the same micro-batches of 2: only the order of the gradient sums differs (ranks all-reduce).
    out = tmp_path / "ddp"
    r = torchrun(corpus, out, "--dtype", "float32", "--batch_size", "2", "--accumulation_steps", "2",
                 "--max_steps", "6", "--save_interval", "3")
    assert r.returncode == 0, r.stderr
    assert "ranks 2" in r.stdout and r.stdout.count("saved ") == 1  # only rank 0 writes
    assert max_diff(out, single_fp32) <= 1e-6
    # Resume the 2-rank checkpoint (step 3) on ONE process: the cursor maps by samples consumed.
    (out / "model.safetensors").unlink()
    r = engine_run(corpus, out, "--dtype", "float32", "--batch_size", "2", "--accumulation_steps", "4",
                   "--max_steps", "6", "--from_resume", "1")
    assert r.returncode == 0, r.stderr
    assert "cursor mapped: 2 rank(s) x 8 samples/step, step 3 = 24 samples into epoch 0 -> 1 rank(s) x 8 " \
           "samples/step: step 3" in r.stdout
    assert max_diff(out, single_fp32) <= 1e-6


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(corpus, single_fp32, tmp_path):
    out = tmp_path / "fsdp"
    r = torchrun(corpus, out, "--fsdp", "1", "--dtype", "float32", "--batch_size", "2", "--accumulation_steps", "2",
                 "--max_steps", "6", "--save_interval", "3")
    assert r.returncode == 0, r.stderr
    assert max_diff(out, single_fp32) <= 1e-6
    # The sharded run's checkpoint is a whole model plus a full optimizer state.
    from minimind.resume import load_training_checkpoint
    ck = load_training_checkpoint(str(ckpt(out, 3)))
    assert ck["state"]["world_size"] == 2 and ck["optimizer"]["optimizer"]["state"]


# ---------------------------------------------------------------------------------------------------------------
# Seeing the run: held-out loss in metrics.jsonl, swanlab offline
# ---------------------------------------------------------------------------------------------------------------
def test_eval_and_swanlab_offline(corpus, tmp_path):
    out = tmp_path / "run"
    r = engine_run(corpus, out, "--max_steps", "4", "--log_interval", "2", "--eval_interval", "2",
                   "--use_swanlab", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(val) == 2 and all(0 < v < 20 for v in val)
    assert any("loss" in row and "lr" in row for row in rows)
    assert "held out" in r.stdout
    # swanlab wrote its offline run (config + the logged metrics) inside the out dir; the final save kept it.
    runs = glob.glob(str(out / "swanlog" / "run-*" / "run-*.swanlab"))
    assert len(runs) == 1
    blob = Path(runs[0]).read_bytes()
    assert b"val_loss" in blob and b"loss" in blob
    assert (out / "model.safetensors").exists() and (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# In-process pieces: final save keeps the run's files, random streams round-trip, activation checkpointing
# ---------------------------------------------------------------------------------------------------------------
def _tiny_model():
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))


def test_final_save_keeps_checkpoints_and_metrics(tmp_path):
    from minimind.checkpoint import load_state_dict, save_model
    out = tmp_path / "out"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    (out / "checkpoints" / "step_000002" / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "stale.bin").write_text("from an older model")
    model = _tiny_model()
    save_model(model, None, str(out))
    assert (out / "checkpoints" / "step_000002" / "trainer_state.json").read_text() == "{}"
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert not (out / "stale.bin").exists()          # everything else is replaced, atomically
    assert torch.equal(load_state_dict(str(out))["model.norm.weight"], model.model.norm.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_rng_streams_round_trip_through_a_checkpoint_file(tmp_path):
    import random

    import numpy as np
    from minimind.resume import rng_state, set_rng_state
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save([rng_state()], tmp_path / "rng.pt")
    draw = lambda: (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))  # noqa
    first = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)[0])
    second = draw()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


def test_grad_checkpointing_gives_the_same_gradients():
    from minimind.train import enable_grad_checkpointing
    x = torch.randint(0, 256, (2, 16))
    grads = []
    for ckpt_on in (False, True):
        model = _tiny_model().double()
        if ckpt_on:
            enable_grad_checkpointing(model)
        model(x, targets=x).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-12)
