"""The ``gradguard`` command: the demo end to end (quick), its measurements, and the dispatcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from wandb_reader import find_run_files, load_run

from lightning_gradguard.cli import main as cli_main
from lightning_gradguard.demo.run import dead_fraction, parse_args, results_table

ROOT = Path(__file__).resolve().parents[2]


def _gradguard(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_gradguard.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    env = {
        "WANDB_SILENT": "true",
        **{
            v: str(out / v.lower())
            for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")
        },
    }
    done = _gradguard(
        "demo", "--quick", "--only", "exploding", "--no-progress", "--out", str(out),
        cwd=out, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_quick_demo_prints_the_table_and_where_everything_is(quick_demo: tuple[Path, str]) -> None:
    out, stdout = quick_demo
    assert "| exploding | without GradGuard |" in stdout
    assert "| exploding | with GradGuard |" in stdout
    assert f"wandb sync {out / 'wandb'}/offline-run-*" in stdout
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("gradient_flow.png", "clipping.png"):
        assert (out / "exploding" / "with_gradguard" / name).stat().st_size > 1000


@pytest.mark.slow
def test_quick_demo_exploding_diverges_without_and_stays_finite_with(
    quick_demo: tuple[Path, str],
) -> None:
    out, _ = quick_demo
    results = {r["label"]: r for r in json.loads((out / "results.json").read_text())}
    without, guarded = results["without GradGuard"], results["with GradGuard"]
    assert not without["guarded"] and guarded["guarded"]
    # S2b explodes within a few steps without clipping (NaN turns into a NaN JSON value).
    assert str(without["final_loss"]) == "nan"
    assert without["accuracy"] == pytest.approx(0.1, abs=0.02)
    assert 0 < guarded["final_loss"] < 100  # initial loss is ~288
    assert "gradient_flow.png" in " ".join(guarded["pictures"])


@pytest.mark.slow
def test_quick_demo_writes_real_offline_wandb_runs(quick_demo: tuple[Path, str]) -> None:
    out, _ = quick_demo
    runs = [load_run(path.parent) for path in find_run_files(out / "wandb")]
    assert len(runs) == 2
    guarded = [r for r in runs if r.series("clip/threshold", step_key="trainer/global_step")]
    assert len(guarded) == 1
    norms = [v for _, v in guarded[0].series("grad_norm/total", step_key="trainer/global_step")]
    assert norms and all(v is None or v > 0 for v in norms)
    assert all(r.series("train/loss", step_key="trainer/global_step") for r in runs)


def test_dead_fraction_counts_units_never_positive() -> None:
    # Seeded: with about one draw in five, one of the 5 live units of the second layer is
    # also never positive, and the hand count below is no longer 6 of 8.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(), nn.Linear(8, 2)
    )
    with torch.no_grad():
        net[0].bias[:3] = -1e3  # 3 of 8 dead in the first layer
        net[2].bias[:6] = -1e3  # 6 of 8 dead in the second
    x = torch.randn(256, 4)
    pre = net[2](torch.relu(net[0](x)))
    independent = 1 - (pre > 0).any(dim=0).float().mean().item()
    assert independent == pytest.approx(6 / 8)
    assert dead_fraction(net, x) == pytest.approx(independent)
    assert net.training  # mode restored


def test_table_marks_divergence() -> None:
    from lightning_gradguard.demo.run import RunResult

    row = RunResult("exploding", "without GradGuard", False, 0.1, float("nan"), 0, 1.0, "-", 2.0)
    assert "| nan (diverged) |" in results_table([row])


def test_command_line_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 2
    assert cli_main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli_main(["dmeo"]) == 2
    assert "unknown command 'dmeo'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--only", "explode"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'explode'" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "gradguard"
    assert script.exists(), "pip install -e . creates the `gradguard` command"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "gradguard demo --help" in done.stdout


@pytest.mark.slow
def test_online_mode_without_login_says_what_to_do(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    done = _gradguard(
        "demo", "--quick", "--only", "exploding", "--wandb", "online", "--out", str(tmp_path),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert "run `wandb login` first, or use --wandb offline" in done.stderr
    assert "Traceback" not in done.stderr


def test_loss_spike_scenario_bursts_the_learning_rate_and_recovers_with_spike_recovery() -> None:
    import pytorch_lightning as pl

    from lightning_gradguard import GradGuard
    from lightning_gradguard.demo.scenarios import LOSS_SPIKE_BURST, SCENARIOS

    assert [s.name for s in SCENARIOS][-1] == "loss_spike"
    assert parse_args(["--only", "loss_spike"]).only == ["loss_spike"]
    scenario = SCENARIOS[-1]
    without, plain, recovering = scenario.runs
    assert not without.guarded and plain.guarded and recovering.guarded
    assert GradGuard(**plain.guard_args).recovery is None
    guard = GradGuard(**recovering.guard_args)
    assert guard.recovery is not None and guard.recovery.every_n_steps == 25
    # The burst: the learning rate the optimizer really steps with, by step.
    model = recovering.make_model()
    model.burst_start = 3  # the same burst, earlier, to keep the run short
    seen: list[float] = []

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer: object, pl_module: object, opt: object) -> None:
            seen.append(opt.param_groups[0]["lr"])  # type: ignore[attr-defined]

    x = torch.randn(64 * 20, 64)
    y = torch.randint(0, 10, (64 * 20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    pl.Trainer(
        max_steps=20, logger=False, callbacks=[Probe()], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, loader)  # fmt: skip
    expected = [1e-3] * 3 + [1e-3 * f for f in LOSS_SPIKE_BURST] + [1e-3] * 5
    assert seen == pytest.approx(expected, rel=1e-12)
