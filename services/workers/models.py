"""Warm models: the classifiers and diffusion pipelines an actor keeps loaded between jobs.

Loading a Stable Diffusion pipeline takes seconds to minutes (and a GPU's memory), a classifier
less but still more than a small job's own work. A long-lived actor therefore keeps the last few
of each kind in an LRU (:class:`WarmModels`, sized by ``WorkerSettings.model_cache_size``) and
hands the same objects to every job that asks for the same model.

Sharing is safe because an actor runs one job at a time and jobs don't change what they get:

- classifiers: ``genq_core`` copies a model before folding or quantizing it;
- pipelines: ``generate_images`` sets the scheduler it needs on each call, nothing else changes.
  Textual inversion (the data-scarce mode) does change a pipeline (it adds tokens), so such a job
  asks with ``exclusive=True`` and gets a private copy that is never cached.

A model's identity is what decides its weights: the resolved classifier config (with the
weights file's size and mtime, so a replaced file is loaded anew), the builder, the device; the
generator's source (with its ``model_index.json`` stat for a local folder), dtype and device.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

from genq_core.classifier import Builder, LoadedClassifier, load
from genq_core.generate import set_scheduler
from genq_core.pipeline import GenQConfig, load_generator_for

__all__ = ["LOADING", "WarmModels"]

logger = logging.getLogger(__name__)

LOADING = threading.RLock()
"""Held while a model is loaded, copied or built in this process.

diffusers (through accelerate's ``init_empty_weights``) patches torch process-wide while it loads
a pipeline: a module built at the same time in another thread gets empty "meta" weights. Ray
actors are processes of their own; inline workers share one, so their loads take turns. (Other
module construction, e.g. quantizer state, is not covered: run one inline worker per process in
production, or Ray.) It guards no state, only the loading itself."""


class WarmModels:
    """A :class:`~services.workers.runner.ModelProvider` that keeps models loaded (LRU per kind).

    Not thread-safe: one actor runs one job at a time, so nothing calls one instance
    concurrently (loads in different instances of one process are serialized, see ``LOADING``).

    Args:
        size: how many classifiers, and separately how many pipelines, stay loaded
            (``WorkerSettings.model_cache_size``).

    Attributes:
        loads: how many times each kind was loaded from its source (``classifier``,
            ``generator``); an exclusive copy of a cached pipeline is not a load.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.loads: dict[str, int] = {"classifier": 0, "generator": 0}
        self._classifiers: OrderedDict[Hashable, LoadedClassifier] = OrderedDict()
        self._generators: OrderedDict[Hashable, Any] = OrderedDict()

    def classifier(self, config: GenQConfig, builder: Builder | None) -> LoadedClassifier:
        """The float classifier of ``config`` on ``config.device``, loaded once per identity."""
        key = _classifier_key(config, builder)
        cached = self._classifiers.get(key)
        if cached is not None:
            self._classifiers.move_to_end(key)
            return cached
        with LOADING:
            loaded = load(config.classifier, builder, device=torch.device(config.device))
        self.loads["classifier"] += 1
        self._remember(self._classifiers, key, loaded, config.device)
        return loaded

    def generator(self, config: GenQConfig, *, exclusive: bool) -> Any:
        """The diffusion pipeline of ``config``, with ``config.generation.scheduler`` set.

        ``exclusive``: the caller will change the pipeline (textual inversion adds tokens), so it
        gets a deep copy of the cached one, or a fresh load when none is cached; neither is
        cached, so the shared pipeline never learns a job's tokens.
        """
        key = _generator_key(config)
        cached = self._generators.get(key)
        if cached is not None:
            self._generators.move_to_end(key)
            if exclusive:
                with LOADING:
                    pipe = copy.deepcopy(cached)
            else:
                pipe = cached
        else:
            with LOADING:
                pipe = load_generator_for(config)
            self.loads["generator"] += 1
            if not exclusive:
                self._remember(self._generators, key, pipe, config.device)
        # load_generator_for sets the job's scheduler; a cached pipeline may hold another job's
        set_scheduler(pipe, config.generation.scheduler)
        return pipe

    def stats(self) -> dict[str, int]:
        """Loads so far and how many models are cached now (for logs and tests)."""
        return {
            "classifier_loads": self.loads["classifier"],
            "generator_loads": self.loads["generator"],
            "classifiers_cached": len(self._classifiers),
            "generators_cached": len(self._generators),
        }

    def clear(self) -> None:
        """Drop every cached model (and the GPU memory they held)."""
        self._classifiers.clear()
        self._generators.clear()
        _release_gpu_memory()

    def _remember(
        self, cache: OrderedDict[Hashable, Any], key: Hashable, value: Any, device: str
    ) -> None:
        cache[key] = value
        evicted = False
        while len(cache) > self.size:
            old_key, _ = cache.popitem(last=False)
            logger.info("evicted warm model %s", old_key)
            evicted = True
        if evicted and torch.device(device).type == "cuda":
            _release_gpu_memory()


def _classifier_key(config: GenQConfig, builder: Builder | None) -> Hashable:
    classifier = config.classifier
    # repr: the config holds tuples, paths and nested frozen dataclasses, all with a stable repr
    described = repr(dataclasses.asdict(classifier))
    return ("classifier", described, _file_identity(classifier.weights), builder, config.device)


def _generator_key(config: GenQConfig) -> Hashable:
    source = config.generator.source or ""
    index = Path(source).expanduser() / "model_index.json"
    return ("generator", source, _file_identity(index), config.generator.dtype, config.device)


def _file_identity(path: Path | None) -> tuple[int, int] | None:
    """(size, mtime) of a local file, so a file replaced in place is loaded anew."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _release_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
