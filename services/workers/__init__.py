"""Workers: the dispatcher, the Ray actors it places jobs on, and the staged job runner they host.

- ``settings``: :class:`~services.workers.settings.WorkerSettings` (``GENQ_*`` variables).
- ``resolve``: a job's request -> a ``genq_core`` config (built-in models, uploads, datasets).
- ``storage``: :class:`~services.workers.storage.JobStorage`, a job's keys over two buckets.
- ``shards``: generation cut into independent class x image ranges.
- ``checkpoints``: the per-stage checkpoints that let a retried attempt resume.
- ``runner``: :func:`~services.workers.runner.run_job`, one attempt of one job, stage by stage.
- ``models``: :class:`~services.workers.models.WarmModels`, the LRU of loaded models per actor.
- ``actors``: the worker body, its Ray actor and the pool of actors over the cluster's nodes.
- ``dispatcher``: reads the queue, fans generation shards out over idle actors (fair share
  between jobs), heartbeats, finishes, retries or requeues each attempt.
- ``sweeps``: repairs for dead letters and jobs whose enqueue was lost.

``python -m services.workers`` runs a dispatcher (``--inline``: without Ray).
"""
