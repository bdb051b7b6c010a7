"""Loading the text-to-image generator (any diffusers ``DiffusionPipeline``) and its scheduler.

Production loads Stable Diffusion 1.5 / 2.1 / SD-Turbo / SDXL from the Hugging Face Hub by id;
tests and the offline benchmark load a folder written by ``save_pretrained``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

# Imported from their modules: mypy reads diffusers' top-level names as dummy classes.
from diffusers.configuration_utils import ConfigMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler

__all__ = ["SCHEDULERS", "load_generator", "set_scheduler"]

logger = logging.getLogger(__name__)

# Scheduler name -> class; "default" is the scheduler the pipeline was loaded with.
SCHEDULERS: dict[str, type[ConfigMixin] | None] = {
    "default": None,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
}

# Attribute under which set_scheduler keeps the pipeline's own scheduler for "default".
_DEFAULT_SCHEDULER_ATTR = "_genq_default_scheduler"


def load_generator(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    scheduler: str | None = None,
) -> DiffusionPipeline:
    """Load a text-to-image pipeline ready to generate.

    Args:
        source: a local folder written by ``save_pretrained`` (loaded with
            ``local_files_only=True``), or a Hugging Face Hub id such as
            ``"stabilityai/sd-turbo"``. Anything that exists on disk, or starts with ``/``, ``.``
            or ``~``, is treated as a folder.
        device: where the pipeline runs.
        dtype: weight dtype; default float16 on CUDA, float32 elsewhere.
        scheduler: a key of :data:`SCHEDULERS`; ``None`` keeps the pipeline's own.

    Returns:
        The pipeline on ``device``, safety checker off, progress bar disabled.

    Raises:
        FileNotFoundError: a local folder that does not exist.
        ValueError: a folder without ``model_index.json``, or an unknown scheduler.
        OSError: the Hub id could not be loaded (offline, unknown id).
    """
    # 1. check inputs
    target = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if target.type == "cuda" else torch.float32
    if scheduler is not None:
        _scheduler_class(scheduler)
    text = str(source)
    local = Path(text).expanduser()
    is_local = local.exists() or text.startswith(("/", ".", "~")) or isinstance(source, Path)

    # 2. a local folder (which must hold model_index.json) or a Hub id
    if is_local:
        if not local.is_dir():
            raise FileNotFoundError(f"generator folder {local} does not exist")
        if not (local / "model_index.json").is_file():
            raise ValueError(
                f"{local} is not a diffusers pipeline folder (no model_index.json); "
                "write one with pipe.save_pretrained(folder)"
            )
        location, hub_kwargs = str(local), {"local_files_only": True}
    else:
        location, hub_kwargs = text, {}

    # 3. load, with the safety checker off where the pipeline has one
    try:
        index = DiffusionPipeline.load_config(location, **hub_kwargs)
        kwargs: dict[str, Any] = {}
        if "safety_checker" in index:
            kwargs = {"safety_checker": None, "requires_safety_checker": False}
        pipe = DiffusionPipeline.from_pretrained(location, dtype=dtype, **hub_kwargs, **kwargs)
    except Exception as err:
        if is_local:
            raise ValueError(f"cannot load the generator in {local}: {err}") from err
        raise OSError(
            f"cannot load generator {text!r} from the Hugging Face Hub: {err}. "
            "Without network access, pass a local folder written by save_pretrained."
        ) from err

    # 4. device, progress bar, scheduler
    pipe = pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    logger.info("loaded generator %s (%s) on %s as %s", text, type(pipe).__name__, target, dtype)
    return pipe


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Replace ``pipe``'s scheduler in place by the one called ``name``.

    The new scheduler is built from the pipeline's own scheduler config (noise schedule,
    ``steps_offset``, prediction type), so only the sampling method changes; ``"pndm"`` skips
    the Runge-Kutta warm-up (PLMS, as in Stable Diffusion) unless that config says otherwise.
    ``"default"`` restores the scheduler the pipeline had before the first call.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a pipeline
            without a scheduler.
    """
    scheduler_class = _scheduler_class(name)
    current = getattr(pipe, "scheduler", None)
    if current is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler to replace")
    original = getattr(pipe, _DEFAULT_SCHEDULER_ATTR, None)
    if original is None:
        original = current
        setattr(pipe, _DEFAULT_SCHEDULER_ATTR, original)
    if scheduler_class is None:
        replacement = original
    else:
        overrides = {}
        if scheduler_class is PNDMScheduler and "skip_prk_steps" not in original.config:
            # PLMS, as Stable Diffusion uses PNDM; the Runge-Kutta warm-up needs >= 4 steps.
            overrides["skip_prk_steps"] = True
        replacement = scheduler_class.from_config(original.config, **overrides)
    pipe.scheduler = replacement


def _scheduler_class(name: str) -> type[ConfigMixin] | None:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name]
