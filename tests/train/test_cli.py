"""End-to-end tests of the command line on a tiny configuration (seconds each)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from slimtrain.cli import main
from slimtrain.train import bench
from slimtrain.train.trainer import CHECKPOINT, TrainConfig, Trainer, learning_rate, read_metrics, train

TINY = ["--model", "tiny", "--data", "python-docs", "--steps", "6", "--batch-size", "4", "--seq-len", "32",
        "--eval-every", "3", "--eval-batches", "2", "--checkpoint-every", "3", "--no-compile", "--quiet"]


def losses(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(run_dir)]


def checkpoint_model(run_dir) -> dict:
    return torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        left, right = a[key], b[key]
        if hasattr(left, "codes"):  # quantized weights: compare the stored codes and scales
            assert torch.equal(left.codes.view(torch.uint8), right.codes.view(torch.uint8)), key
            assert torch.equal(left.scales, right.scales), key
        else:
            assert torch.equal(left, right), key


def test_train_writes_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", CHECKPOINT, "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "slim" and summary["steps"] == 6
    assert [r[0] for r in losses(run)] == [1, 2, 3, 4, 5, 6]
    # ln(256) = 5.55; untrained (lr 1e-12) 5.52; trained 5.23
    assert losses(run)[-1][2] == summary["val_loss"] and summary["val_loss"] < 5.4
    # measured static memory: FP8 weights and 4/2-bit states are far below FP32 AdamW's
    assert summary["static_bytes"] < summary["same_model_static_bytes"]["adamw"] / 3
    out = capsys.readouterr().out
    assert "validation loss" in out and "B/param" in out and "peak process memory" in out


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C after step 4 saves a checkpoint; --resume continues to the same losses and weights
    (slim recipe: FP8 weights, ECO with stochastic rounding, 4/2-bit states)."""
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert main(["train", *TINY, "--out", str(whole)]) == 0

    original = Trainer.train_step

    def interrupted_step(self):
        loss = original(self)
        if self.step == 4:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends
        return loss

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(parted)]) == 130
    assert "nats/token (at step 3)" in capsys.readouterr().out  # validated every 3 steps
    assert torch.load(parted / CHECKPOINT, weights_only=True)["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(["train", "--resume", str(parted), "--quiet"]) == 0
    assert losses(parted) == losses(whole)
    assert_same_model(checkpoint_model(parted), checkpoint_model(whole))


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    before = (run / CHECKPOINT).read_bytes()

    def crash(obj, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    assert main(["train", "--resume", str(run), "--steps", "9", "--quiet"]) == 2
    assert (run / CHECKPOINT).read_bytes() == before


def test_resume_refuses_fewer_steps_and_tells_of_a_longer_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 2
    assert "--steps 4 is fewer than the 6 steps" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["steps"] == 6  # untouched
    assert main(["train", "--resume", str(run), "--steps", "8", "--quiet"]) == 0
    assert "the learning-rate schedule now spans 8 steps" in capsys.readouterr().out
    assert [r[0] for r in losses(run)] == list(range(1, 9))


def test_resume_refuses_out_and_force_and_settings_that_change_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    for extra, message in [(["--out", str(tmp_path / "other")], "drop --out/--force"),
                           (["--force"], "drop --out/--force"),
                           (["--lr", "1e-2"], "only --checkpoint-every")]:
        assert main(["train", "--resume", str(run), *extra, "--quiet"]) == 2
        assert message in capsys.readouterr().err, extra


def test_a_reader_that_stops_early_is_not_an_error():
    """`slimtrain plan ... | head -1`: the closed pipe ends the command quietly, with status 0."""
    command = (f"{sys.executable} -m slimtrain plan --model llama-2-7b | head -1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("llama-2-7b: 6,738,415,616 parameters")
    assert "error" not in result.stderr


def test_a_nan_gradient_stops_the_run_without_losing_state(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original = Trainer.loss

    def poisoned(self, inputs, targets):
        loss = original(self, inputs, targets)
        return loss * float("nan") if self.step == 2 and self.model.training else loss

    monkeypatch.setattr(Trainer, "loss", poisoned)
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert "non-finite loss or gradient at step 3" in capsys.readouterr().err
    saved = torch.load(run / CHECKPOINT, weights_only=True)
    assert saved["step"] == 2
    # resuming without the fault reproduces the uninterrupted run
    monkeypatch.setattr(Trainer, "loss", original)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert main(["train", *TINY, "--out", str(tmp_path / "clean")]) == 0
    assert losses(run) == losses(tmp_path / "clean")


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    saved = torch.load(run / CHECKPOINT, weights_only=True)

    saved["config"]["recipe"] = "adamw"  # a checkpoint of FP8/4-bit tensors claimed as FP32 AdamW
    torch.save(saved, run / CHECKPOINT)
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "does not fit" in capsys.readouterr().err

    (run / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "corrupt" in capsys.readouterr().err

    assert main(["train", "--resume", str(run), "--recipe", "adamw", "--quiet"]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_an_existing_run_directory_needs_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", *TINY, "--out", str(run), "--force"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/corpus"], "no such file"),
    (["--data", "EMPTY"], "empty"),
    (["--data", "BINARY"], "binary"),
    (["--data", "SHORT"], "too long for the corpus"),
    (["--seq-len", "65"], "exceeds the context"),
    (["--tokenizer", "/no/such/tokenizer.json"], "tokenizer"),
    (["--recipe", "lordo", "--lordo", "rank_of_q=3"], "unknown lordo option(s) rank_of_q"),
    (["--lordo", "svd=randomized"], "lordo_options applies to recipes of method lordo, not to 'slim'"),
    (["--sync-every", "4"], "sync_every applies to recipes of method diloco or lordo"),
    (["--recipe", "diloco", "--omega", "0.3"], "omega applies to recipes of method lordo, not to 'diloco'"),
    (["--recipe", "lordo", "--lordo", "svd=qr"], "svd must be one of"),
    (["--optim", "block=64"], "unknown optim option(s) block; accepted: beta1"),
    (["--recipe", "lordo", "--optim", "block_size=64"], "optim_options applies to recipes of method adamw"),
    (["--optim", "state_maps=log,log"], "state_maps"),
    (["--optim", "block_size=7"], "block_size"),
    (["--optim", "beta1=2"], "optim option beta1 must be a number in [0.0, 1.0)"),
    pytest.param(["--device", "cuda"], "device 'cuda': this torch build sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    files = {"EMPTY": b"  \n", "BINARY": b"\x00\x01\x02abc", "SHORT": b"To be, or not to be."}
    argv = [str(tmp_path / f) if f in files else f for f in argv]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    run = tmp_path / "run"
    assert main(["train", *TINY, *argv, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimtrain: error:") and message in err[0]
    assert not (run / CHECKPOINT).exists()


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "fp7"], "invalid choice"),
    (["--model", "huge"], "invalid choice"),
    (["--steps", "0"], "must be >= 1"),
    (["--lr", "nan"], "must be > 0"),
    (["--lr=-1e-3"], "must be > 0"),
    (["--batch-size", "two"], "not a valid int"),
    (["--lordo", "svd"], "is not KEY=VALUE"),
    (["--device", "gpu"], "invalid choice"),
])
def test_invalid_options_are_rejected_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimtrain train: error:") and message in err[0]


def test_the_installed_command_prints_no_traceback():
    result = subprocess.run([sys.executable, "-m", "slimtrain", "train", "--data", "/no/such/corpus"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "slimtrain: error: --data /no/such/corpus: no such file or directory, and not a built-in corpus "
        "(shakespeare, python-docs)"
    ]


def test_compare_writes_a_table_and_a_frontier_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "adamw", "slim", *TINY, "--sync-every", "4", "--out", str(out)]) == 0
    table = (out / "compare.md").read_text().splitlines()
    assert table[0].startswith("| recipe | val loss | vs adamw | static B/param")
    rows = {line.split("|")[1].strip(): line.split("|") for line in table[2:]}
    assert set(rows) == {"adamw", "slim"}
    assert rows["adamw"][3].strip() == "+0.00%"
    assert float(rows["slim"][4]) < float(rows["adamw"][4]) / 3  # static bytes per parameter
    assert (out / "frontier.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "compare.md" in printed and "== adamw (without sync_every: not of its method)" in printed
    assert main(["compare", "--recipes", "adamw", "slim", "adamw", "--out", str(out)]) == 2
    assert "--recipes names adamw more than once" in capsys.readouterr().err
    assert main(["compare", "--recipes", "adamw", "--out", str(out)]) == 2  # it exists: no --resume
    assert "--force to overwrite it\n" in capsys.readouterr().err + "\n"


def test_plan_prints_known_architecture_numbers(capsys):
    assert main(["plan", "--model", "llama-2-7b"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out
    adamw = next(line for line in out.splitlines() if line.startswith("adamw "))
    assert adamw.split()[-2:] == ["12.000", "1.000"]  # 4 B weights + 8 B states per parameter
    assert "largest relative difference: 0.00%" in out


def test_recipes_lists_every_recipe(capsys):
    from slimtrain.train.recipes import RECIPES

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in RECIPES)


def test_a_users_own_module_trains_through_the_python_api(tmp_path, capsys):
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(256, 64)
            self.out = nn.Linear(64, 256)

        def forward(self, idx):
            return self.out(self.table(idx))

    config = TrainConfig(recipe="eco-sr", data="python-docs", steps=4, batch_size=4, seq_len=16,
                         eval_every=2, eval_batches=1, compile=False, out=str(tmp_path / "own"))
    result = train(config, model=Bigram(), progress=False, log=lambda _: None)
    assert result.summary["model"] == "custom" and result.summary["steps"] == 4
    assert result.summary["static_memory"]["parameters"] < 4 * result.summary["parameters"]
    # the command line cannot rebuild the user's module: one clear line, not a traceback
    assert main(["train", "--resume", str(tmp_path / "own"), "--steps", "6", "--quiet"]) == 2
    assert "model given in Python" in capsys.readouterr().err


def test_optim_options_reach_the_optimizer_and_the_memory_count(tmp_path):
    base = dict(recipe="solo-2-2", model="tiny", data="python-docs", steps=1, batch_size=2, seq_len=16,
                eval_every=1, eval_batches=1, compile=False)
    runs = {}
    for name, options in (("default", {}), ("small-blocks", dict(block_size=32, beta1=0.7,
                                                                    state_maps="linear,log"))):
        config = TrainConfig(**base, optim_options=options)
        (tmp_path / name).mkdir()
        trainer = Trainer(config, tmp_path / name, progress=False, log=lambda _: None)
        group = trainer.optimizer.param_groups[0]
        runs[name] = trainer.run().summary
        assert config.to_dict()["optim_options"] == options
        if options:
            assert group["block_size"] == 32 and group["betas"][0] == 0.7
            assert tuple(group["state_maps"]) == ("linear", "log")
    # more scales per element: blocks of 32 hold more state bytes, as measured and as planned
    default, small = runs["default"]["static_memory"], runs["small-blocks"]["static_memory"]
    assert small["optimizer_state"] > default["optimizer_state"]
    assert small["parameters"] == default["parameters"]


def test_bench_prints_ratios_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "64K", "--steps", "1", "--warmup", "1", "--only", "(4, 2)",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torch AdamW fused" in printed and "st.AdamW (4, 2)" in printed and "copy bandwidth" in printed
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert rows["torch AdamW fused"]["ratio_to_fused"] == 1.0
    assert rows["torch AdamW fused"]["bytes_moved_per_param"] == pytest.approx(28.0, abs=1e-3)
    low_bit = rows["st.AdamW (4, 2)"]
    assert low_bit["numel"] == 65536 and low_bit["state_bytes_per_param"] < 0.9
    assert low_bit["bytes_moved_per_param"] == pytest.approx(12 + 2 * low_bit["state_bytes_per_param"])
    assert low_bit["fraction_of_copy"] > 0 and report["copy_bandwidth_gbs"] > 0
    assert report["device"] == "cpu" and report["failed_peers"] == {}


def test_bench_ratio_is_the_median_of_steps_paired_with_fused_ones(monkeypatch):
    """Each timed step of a configuration is divided by a fused AdamW step timed just before it
    (a clock that gives fused steps 2 s and others 6 s, except one 30 s outlier)."""
    others = iter([6.0, 6.0, 30.0] + [6.0] * 100)  # the first configuration: first step, then 3 timed

    def seconds(action, device):
        action()
        owner = getattr(action, "__self__", None)
        if owner is None:  # the copy-bandwidth probe
            return 1.0
        return 2.0 if isinstance(owner, torch.optim.AdamW) and owner.defaults["fused"] else next(others)

    monkeypatch.setattr(bench, "_seconds", seconds)
    report = bench.run_bench([4096], steps=3, warmup=1, only=["st.AdamW (4, 2)"])
    rows = {row["name"]: row for row in report["results"]}
    assert rows["torch AdamW fused"]["ratio_to_fused"] == 1.0
    assert rows["torch AdamW fused"]["step_ms"] == 2000.0
    for name in ("st.AdamW (4, 2)", "st.AdamW (4, 2) eager"):
        assert rows[name]["ratio_to_fused"] == 3.0 and rows[name]["step_ms"] == 6000.0
    # the spread of the pairs: quartiles of (3, 15, 3) for the first, (3, 3, 3) for the second
    assert [rows[name][key] for name in ("st.AdamW (4, 2)", "st.AdamW (4, 2) eager")
            for key in ("ratio_low", "ratio_high")] == [3.0, 9.0, 3.0, 3.0]


def test_bench_times_each_step_after_an_untimed_one_of_its_own(monkeypatch):
    """Caches as a loop of its own steps leaves them: in every pair, the fused step and the
    configuration's step are each timed right after an untimed step of the same optimizer."""
    calls = []

    class Logged(torch.optim.SGD):
        def __init__(self, params, label, **options):
            super().__init__(params, lr=1e-3, **options)
            self.label = label

        def step(self, closure=None):
            calls.append(self.label)
            return super().step(closure)

    def seconds(action, device):
        calls.append("timed")
        action()
        return 1.0

    monkeypatch.setattr(bench, "configurations", lambda: {
        bench.BASELINE: lambda p: Logged(p, "fused"), "probe": lambda p: Logged(p, "probe")})
    monkeypatch.setattr(bench, "_seconds", seconds)
    bench.run_bench([4096], steps=2, warmup=1)
    probe_part = calls[calls.index("probe") - 1:]  # from the probe's first (timed) step on
    pair = ["fused", "timed", "fused", "probe", "timed", "probe"]
    assert probe_part == ["timed", "probe"] + pair + pair


def test_a_failing_peer_is_reported_and_left_out(monkeypatch, capsys):
    """A peer library that cannot run here must not end the benchmark (slimtrain's own rows must)."""
    def broken(params):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(bench, "peers", lambda: {"broken AdamW": broken})
    assert main(["bench", "--sizes", "64K", "--steps", "1", "--warmup", "1", "--only", "broken"]) == 0
    printed = capsys.readouterr().out
    assert "broken AdamW: failed on this machine, left out (RuntimeError: no kernel image" in printed
    assert "torch AdamW fused" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_bench_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "--device cuda: this torch build sees no CUDA device" in capsys.readouterr().err


def test_bench_says_when_only_matches_nothing(capsys):
    assert main(["bench", "--only", "zzz", "--sizes", "1K"]) == 2
    assert "--only 'zzz' matches no configuration of this machine" in capsys.readouterr().err


def test_plan_takes_the_gpt_sizes_by_their_train_names_and_small_models_in_mib(capsys):
    assert main(["plan", "--model", "small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpt-small: 1,820,352 parameters") and "total MiB" in out
    assert "adamw                    6.94" in out  # 1,820,352 x 4 bytes


@pytest.mark.parametrize("size, message", [("12", "at least 1024"), ("lots", "not a size")])
def test_bench_rejects_bad_sizes(capsys, size, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sizes", size])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_speedups_divide_the_peers_ratio_by_each_configurations():
    """Ratios to fused of 60 (the peer) and 3: 20x faster; only slimtrain rows, size by size,
    and nothing where the peer was not measured."""
    rows = [dict(name="torch AdamW fused", numel=4096, ratio_to_fused=1.0),
            dict(name="peer", numel=4096, ratio_to_fused=60.0),
            dict(name="st.AdamW (4, 2)", numel=4096, ratio_to_fused=3.0),
            dict(name="st.AdamW (4, 2)", numel=8192, ratio_to_fused=2.0)]
    assert bench.speedups(rows, "peer") == [dict(name="st.AdamW (4, 2)", numel=4096, speedup=20.0)]
    assert bench.speedups(rows, "absent") == []


def test_bench_prints_speedups_over_the_named_configuration(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "64K", "--steps", "1", "--warmup", "1", "--only", "st.AdamW (4, 2)",
                 "foreach", "--versus", "torch AdamW foreach", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x faster than torch AdamW foreach" in printed
    report = json.loads(out.read_text())
    ratios = {row["name"]: row["ratio_to_fused"] for row in report["results"]}
    speedups = {row["name"]: row["speedup"] for row in report["speedups"]["rows"]}
    assert report["speedups"]["versus"] == "torch AdamW foreach"
    assert set(speedups) == {"st.AdamW (4, 2)", "st.AdamW (4, 2) eager"}
    expected = ratios["torch AdamW foreach"] / ratios["st.AdamW (4, 2)"]
    assert speedups["st.AdamW (4, 2)"] == pytest.approx(expected)
    # printed with two decimals, so that 19.99 never reads as 20
    assert f"{speedups['st.AdamW (4, 2)']:.2f}\n" in printed.split("x faster than")[1]


def test_bench_measures_the_named_versus_even_outside_only(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sizes", "64K", "--steps", "1", "--warmup", "1", "--only", "st.SGD momentum 4",
                 "--versus", "torch SGD fused", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {row["name"] for row in report["results"]} == {"torch AdamW fused", "torch SGD fused",
                                                          "st.SGD momentum 4-bit"}
    assert [row["name"] for row in report["speedups"]["rows"]] == ["st.SGD momentum 4-bit"]


def test_bench_rejects_an_unknown_versus(capsys):
    assert main(["bench", "--versus", "nothing like it"]) == 2
    err = capsys.readouterr().err
    assert "--versus must name a configuration of this machine" in err and "torch AdamW fused" in err


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine_to_the_floor():
    config = TrainConfig(lr=1e-3, warmup=4, steps=14, min_lr_ratio=0.1)
    rates = [learning_rate(config, step) for step in range(16)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # (step + 1) / warmup
    assert rates[4] == pytest.approx(1e-3)  # the cosine starts at the peak
    assert rates[9] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway: the mean of peak and floor
    assert rates[14] == rates[15] == pytest.approx(1e-4)  # the floor from the last step on
    assert all(a >= b for a, b in zip(rates[4:-1], rates[5:], strict=True))
