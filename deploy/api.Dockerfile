# The REST API: FastAPI on uvicorn, no torch, no Ray (the `api` extra only).
#   docker build -f deploy/api.Dockerfile -t genq-api .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 genq && useradd --system --uid 10001 --gid genq --create-home genq
WORKDIR /opt/genq

# dependencies first (pinned), so code changes don't reinstall them
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY genq_core genq_core
COPY services services
RUN pip install -c requirements/constraints.txt ".[api]"

USER genq
EXPOSE 8000
# the distributed mode's settings all come from GENQ_* variables (deploy/env.example)
CMD ["genq", "serve", "--host", "0.0.0.0", "--port", "8000", "--log-level", "info"]
