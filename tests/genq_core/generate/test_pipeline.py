from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler

from genq_core.generate.pipeline import SCHEDULERS, load_generator, set_scheduler
from genq_core.generate.tiny import build_tiny_pipeline


def _image(pipe: StableDiffusionPipeline, seed: int = 5) -> np.ndarray:
    result = pipe(
        "a photo of a bag",
        num_inference_steps=3,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.asarray(result.images[0])


def test_load_generator_round_trips_a_saved_pipeline(
    tiny_folder: Path, tiny_pipe: StableDiffusionPipeline
) -> None:
    pipe = load_generator(tiny_folder)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.safety_checker is None
    assert pipe._progress_bar_config == {"disable": True}
    set_scheduler(tiny_pipe, "default")
    np.testing.assert_allclose(_image(pipe), _image(tiny_pipe), atol=1e-5)


def test_load_generator_dtype_and_scheduler(tiny_folder: Path) -> None:
    pipe = load_generator(str(tiny_folder), dtype=torch.bfloat16, scheduler="dpm")
    assert pipe.unet.dtype == torch.bfloat16
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)


def test_load_generator_errors(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator("./no/such/folder")
    with pytest.raises(ValueError, match="no model_index.json"):
        load_generator(tmp_path)
    with pytest.raises(ValueError, match="unknown scheduler 'lms'"):
        load_generator(tiny_folder, scheduler="lms")


def test_broken_folder_is_a_value_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
            }
        )
    )
    with pytest.raises(ValueError, match=f"cannot load the generator in {tmp_path}"):
        load_generator(tmp_path)


def test_hub_id_offline_is_a_clear_os_error() -> None:
    start = time.monotonic()
    with pytest.raises(OSError, match="from the Hugging Face Hub"):
        load_generator("genq-test/definitely-not-a-model")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("ddim", DDIMScheduler),
        ("dpm", DPMSolverMultistepScheduler),
        ("euler", EulerDiscreteScheduler),
        ("pndm", PNDMScheduler),
    ],
)
def test_set_scheduler_keeps_the_noise_schedule(name: str, cls: Any) -> None:
    pipe = build_tiny_pipeline()
    original = pipe.scheduler
    set_scheduler(pipe, name)
    assert type(pipe.scheduler) is cls
    for field in ("beta_start", "beta_end", "beta_schedule", "steps_offset"):
        assert pipe.scheduler.config[field] == original.config[field]
    if name == "pndm":
        assert pipe.scheduler.config.skip_prk_steps  # PLMS, as in Stable Diffusion
    assert _image(pipe).shape == (16, 16, 3)  # 3 steps: fine without the PRK warm-up
    set_scheduler(pipe, "default")
    assert pipe.scheduler is original


def test_default_restores_the_loaded_scheduler_after_several_switches() -> None:
    pipe = build_tiny_pipeline()
    original = pipe.scheduler
    set_scheduler(pipe, "euler")
    set_scheduler(pipe, "dpm")
    set_scheduler(pipe, "default")
    assert pipe.scheduler is original
    assert sorted(SCHEDULERS) == ["ddim", "default", "dpm", "euler", "pndm"]


def test_unknown_scheduler_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"known: \['ddim', 'default', 'dpm', 'euler', 'pndm'\]"):
        set_scheduler(build_tiny_pipeline(), "karras")
