"""Interruptions of the training loop (`ResumableTrainer.fit`) and unreadable weight files:
what Ctrl-C leaves behind, and the one-line reasons given for files torch cannot load."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from ovsam_model.train import common as C
from ovsam_model.train import distill as D

from test_distill import _cfg as _distill_cfg, image_dir  # noqa: F401  (fixture: 2 real images)


def _cfg(images: Path, out: Path, **kw) -> D.DistillConfig:
    """test_distill's tiny run, one image a step for two epochs: 4 steps."""
    return _distill_cfg(images, out, **{"batch_size": 1, "epochs": 2, **kw})


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_during_the_final_save_still_leaves_last_pth(image_dir, tmp_path, monkeypatch):
    # --save-every 0: the final save is the run's only one; Ctrl-C there used to lose every step
    out = tmp_path / "run"
    real_save = C.torch_save_atomic
    calls = []

    def interrupted_once(obj, path):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(C, "torch_save_atomic", interrupted_once)
    with pytest.raises(D.DistillInterrupted) as info:
        D.run_distill(_cfg(image_dir, out), progress=False)
    assert info.value.step == 4
    assert torch.load(out / D.LAST, weights_only=True)["step"] == 4
    monkeypatch.setattr(C, "torch_save_atomic", real_save)
    rest = D.run_distill(_cfg(image_dir, out, resume=True), progress=False)
    assert rest.step == 4 and rest.losses == []
    assert _steps(out) == [1, 2, 3, 4]


def test_ctrl_c_inside_an_optimizer_step_is_held_until_the_step_is_complete(image_dir, tmp_path, monkeypatch):
    # SIGINT right after the parameters moved, before the step counter and the schedule: the
    # saved state must be the whole step (counted, logged), not parameters one step ahead of it
    out = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    count = []

    def step_then_ctrl_c(self, *a, **kw):
        result = real_step(self, *a, **kw)
        count.append(1)
        if len(count) == 2:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    with pytest.raises(D.DistillInterrupted) as info:
        D.run_distill(_cfg(image_dir, out), progress=False)
    state = torch.load(out / D.LAST, weights_only=True)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert info.value.step == state["step"] == 2 and adam_steps == {2.0}
    assert _steps(out) == [1, 2]


def test_ctrl_c_guard_leaves_an_ignored_sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with C.CtrlCGuard():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_guard_is_off_for_several_processes():
    # under torchrun a held rank would wait in an all-reduce for ranks that already stopped
    before = signal.getsignal(signal.SIGINT)
    with C.CtrlCGuard(enabled=False) as guard:
        assert signal.getsignal(signal.SIGINT) is before
        guard.hold()
        guard.release()  # nothing pending: no KeyboardInterrupt


def _random_bytes(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 64)  # not a zip, not a pickle: a corrupt download
    return path


def test_a_corrupt_weight_file_is_not_met_with_advice_to_load_it_unsafely(tmp_path):
    from ovsam_model.checkpoint import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(_random_bytes(tmp_path / "clip2sam_lvis_rn50x16.pth"))
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message and "Weights only" not in message
    assert message.startswith("clip2sam_lvis_rn50x16.pth: cannot read weight file (not a plain weight file: corrupt")


def test_a_corrupt_last_pth_is_refused_with_the_reason(tmp_path):
    with pytest.raises(C.ResumeError) as info:
        C.read_resume_state(_random_bytes(tmp_path / "last.pth"), {})
    message = str(info.value)
    assert "weights_only" not in message and "Weights only" not in message
    assert "not a plain weight file: corrupt" in message


def test_finetune_checks_the_held_out_images_before_the_run_starts(data_dir, tmp_path):
    # --val-images without the --val-ann images: refused at once, naming the option, before the
    # run writes anything into --out (it used to fail at the step-0 evaluation, with the file name only)
    from ovsam_model.train import finetune as FT

    mini = data_dir / "coco-val2017-mini"
    if not (mini / "instances.json").is_file():
        pytest.skip("no coco-val2017-mini")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    cfg = FT.FinetuneConfig(ann=mini / "instances.json", images=mini / "images", out=out, model="tiny-256",
                            batch_size=1, epochs=1, max_iters=1, workers=0, save_every=0,
                            val_ann=mini / "instances.json", val_images=empty)
    with pytest.raises(FT.FinetuneError, match=r"^--val-ann .*instances\.json: \d+ annotated image\(s\) missing "
                                               r"under .*empty, e\.g\. \d+\.jpg \(their folder is --val-images"):
        FT.run_finetune(cfg, progress=False)
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()


def test_a_run_removes_the_temp_files_a_killed_save_left(image_dir, tmp_path):
    # SIGKILL during a save leaves `.last.pth.XXXX.tmp`, as large as last.pth; the next run (which
    # holds the folder) removes it, and leaves everything else alone
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".last.pth.k1ll3d.tmp", out / f".{D.DISTILLED}.abc123.tmp", out / ".metrics.jsonl.x.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    mine = out / ".notes.txt.keep.tmp"
    mine.write_text("not a file of the run")
    D.run_distill(_cfg(image_dir, out, epochs=1, max_iters=1), progress=False)
    assert not any(path.exists() for path in stale) and mine.exists()


def _dashes(line) -> str:
    """A line's drawn pattern (get_linestyle() reads '--' for every custom dash pattern)."""
    return str(line._unscaled_dash_pattern)


def test_plot_of_a_distill_and_a_finetune_run_gives_each_loss_series_its_own_line_style(tmp_path):
    # five loss series (loss, mse, ce, bce, dice) across the two runs: with four line styles the
    # total loss and dice were drawn (and listed in the legend) alike
    from ovsam_model.train.plot import build_figure

    for name, terms in (("distill", ("mse",)), ("finetune", ("ce", "bce", "dice"))):
        (tmp_path / name).mkdir()
        lines = [{"step": s, "loss": 1.0 / s, **{t: 0.5 / s for t in terms}} for s in range(1, 4)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    fig = build_figure([tmp_path / "distill", tmp_path / "finetune"])
    ax = next(ax for ax in fig.axes if ax.get_title() == "loss")
    styles = {}
    for line in ax.get_lines():
        styles.setdefault(line.get_label(), set()).add(_dashes(line))
    assert set(styles) == {"loss", "mse", "ce", "bce", "dice"}
    assert all(len(s) == 1 for s in styles.values())
    assert len({next(iter(s)) for s in styles.values()}) == 5
    legend = ax.get_legend()
    drawn = [_dashes(h) for h in legend.legend_handles]
    assert len(set(drawn)) == 5


def test_resume_of_another_commands_state_says_so_not_every_option(tmp_path):
    # finetune --resume on a distill folder listed some 20 options, most of them not the user's to change
    last = tmp_path / "last.pth"
    torch.save({"format": C.STATE_FORMAT, "config": {"teacher": "tiny", "lr": 1e-3, "min_lr_ratio": 0.01}}, last)
    with pytest.raises(C.ResumeError, match=r"is the state of another kind of run \(it has --min-lr-ratio, this one "
                                            r"has --ann\): resume it with the command that made it"):
        C.read_resume_state(last, {"ann": "a.json", "lr": 1e-3, "gamma": 0.1})
    with pytest.raises(C.ResumeError, match=r"made with other options: --lr 0\.001 \(now 0\.01\)$"):
        C.read_resume_state(last, {"teacher": "tiny", "lr": 1e-2, "min_lr_ratio": 0.01})
