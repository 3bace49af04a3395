"""The training app on several ranks: torchrun, checkpoints across ranks, mismatched settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from slimtrain.train.trainer import CHECKPOINT, read_metrics

TINY = ["--model", "tiny", "--data", "python-docs", "--steps", "8", "--batch-size", "4", "--seq-len", "32",
        "--eval-every", "4", "--eval-batches", "2", "--checkpoint-every", "4", "--no-compile", "--quiet"]
ROUNDS = ["--sync-every", "3"]  # diloco and lordo
LORDO = ["--recipe", "lordo", "--low-rank", "4", *ROUNDS]


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", "-m", "slimtrain", "train", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def metrics(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss"), r["sent_bytes"]) for r in read_metrics(run_dir)]


def test_lordo_on_two_ranks_resumes_exactly_where_it_stopped(tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    for args in (["--out", str(whole)], ["--out", str(parted), "--stop-after", "5"],
                 ["--resume", str(parted)]):
        result = torchrun(*LORDO, *TINY, *args) if "--resume" not in args else torchrun(
            *args, "--quiet")
        assert result.returncode == 0, result.stderr[-2000:]
    assert metrics(parted) == metrics(whole)
    assert metrics(whole)[-1][3] > 0  # bytes were sent and counted
    for name in (CHECKPOINT, "checkpoint.rank1.step8.pt"):
        a = torch.load(whole / name, weights_only=True)
        b = torch.load(parted / name, weights_only=True)
        assert a["step"] == b["step"] == 8
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
    # ranks end each round with identical parameters; the last step closes a round
    rank0 = torch.load(whole / CHECKPOINT, weights_only=True)["model"]
    rank1 = torch.load(whole / "checkpoint.rank1.step8.pt", weights_only=True)["model"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_single_worker_recipes_are_refused_under_torchrun(tmp_path):
    result = torchrun("--recipe", "slim", *TINY, "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "trains a single worker" in result.stderr


def _rank_main(rank: int, port: int, out: str, code_file: str) -> None:
    from slimtrain.cli import main

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    lr = "3e-3" if rank == 0 else "1e-3"  # a misconfigured rank
    code = main(["train", "--recipe", "diloco", *ROUNDS, *TINY, "--lr", lr, "--out", out,
                 "--dist-timeout", "30"])
    with open(f"{code_file}.{rank}", "w") as f:
        f.write(str(code))


def test_mismatched_settings_across_ranks_are_detected_at_start(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    ranks = [context.Process(target=_rank_main, args=(r, port, str(tmp_path / "run"), str(tmp_path / "code")))
             for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    hung = [process for process in ranks if process.is_alive()]
    for process in hung:  # never left running after the test
        process.kill()
    assert not hung
    assert [(tmp_path / f"code.{r}").read_text() for r in range(2)] == ["2", "2"]
    assert not (tmp_path / "run" / CHECKPOINT).exists()
