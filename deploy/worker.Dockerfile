# A GPU node of the Ray cluster: the library with diffusers, Ray and the worker plumbing (the
# `worker` extra), PyTorch built for CUDA 13.0, and the reference benchmark's built-in models.
# The same image runs the Ray head and the dispatcher (docker-compose.yml, deploy/k8s/).
#   docker build -f deploy/worker.Dockerfile -t genq-worker .
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

COPY --from=ghcr.io/astral-sh/uv:0.9.7 /uv /usr/local/bin/uv
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 genq && useradd --system --uid 10001 --gid genq --create-home genq \
    && uv venv --python 3.11.11 /opt/venv
WORKDIR /opt/genq

COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY genq_core genq_core
COPY services services
RUN uv pip install --index-strategy unsafe-best-match \
        --extra-index-url https://download.pytorch.org/whl/cu130 \
        -c requirements/constraints.txt ".[worker]"
COPY benchmarks/assets benchmarks/assets

# weights are downloaded once per node into volumes mounted here (HF hub, timm, uploads)
RUN mkdir -p /cache && chown genq:genq /cache
ENV HF_HOME=/cache/huggingface TORCH_HOME=/cache/torch GENQ_MODEL_CACHE_DIR=/cache/genq \
    GENQ_ASSETS_DIR=/opt/genq/benchmarks/assets GENQ_DEVICE=cuda
VOLUME ["/cache"]
USER genq
CMD ["ray", "start", "--address=ray-head:6379", "--num-gpus=1", "--block"]
