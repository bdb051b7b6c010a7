"""Workers: the job runner, and (next) the dispatcher and the Ray actors that host it.

- ``settings``: :class:`~services.workers.settings.WorkerSettings` (``GENQ_*`` variables).
- ``resolve``: a job's request -> a ``genq_core`` config (built-in models, uploads, datasets).
- ``storage``: :class:`~services.workers.storage.JobStorage`, a job's keys over two buckets.
- ``shards``: generation cut into independent class x image ranges.
- ``checkpoints``: the per-stage checkpoints that let a retried attempt resume.
- ``runner``: :func:`~services.workers.runner.run_job`, one attempt of one job, stage by stage.
"""
