"""The daemon side of parameter memory, without a daemon: settings, progress, status."""

from __future__ import annotations

import dataclasses

from memosd.engine import Engine
from memosd.lora import LoraSettings, TrainingProgress
from memosd.ops_lora import LoraRuntime, progress_message
from memosd.settings import LoraSectionSettings


def test_lora_section_defaults_are_the_library_defaults() -> None:
    section = LoraSectionSettings()
    library = LoraSettings()
    shared = [f.name for f in dataclasses.fields(section) if f.name != "auto_retrain"]
    assert shared  # every daemon knob is a LoraSettings field with the same default
    for name in shared:
        assert getattr(section, name) == getattr(library, name), name


def test_runtime_takes_its_defaults_from_the_section(engine: Engine) -> None:
    section = dataclasses.replace(
        LoraSectionSettings(), rank=4, target_modules=("q_proj",), auto_retrain=False
    )
    runtime = LoraRuntime.from_settings(engine, section)
    assert runtime.defaults.rank == 4
    assert runtime.defaults.target_modules == ("q_proj",)
    assert runtime.defaults.learning_rate == LoraSettings().learning_rate
    assert runtime.auto_retrain is False
    assert sorted(runtime.handlers()) == ["lora.retrain", "lora.train"]
    assert all(getattr(h, "exclusive_per_cube", False) for h in runtime.handlers().values())


def test_progress_messages_carry_step_loss_and_eta() -> None:
    fraction, message = progress_message(
        TrainingProgress("training", 3, 12, 2.48171, 4.4, 2310.2, 1.0)
    )
    assert message == "step 3/12, loss 2.4817, ETA 4s, 2310 tokens/s"
    assert 0.05 < fraction < 0.9
    last, _ = progress_message(TrainingProgress("training", 12, 12, None, 0.0, None, 2.0))
    assert fraction < last <= 0.9
    assert progress_message(TrainingProgress("loading", 0, 0, None, None, None, 0.0))[0] < fraction
    assert progress_message(TrainingProgress("evaluating", 12, 12, None, None, None, 0.0))[0] > last
