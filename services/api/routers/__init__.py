"""One router per resource: jobs, uploads, health (with metrics)."""
