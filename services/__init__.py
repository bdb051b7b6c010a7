"""GenQ service: the REST frontend (``services.api``) and the Ray workers (``services.workers``)."""
