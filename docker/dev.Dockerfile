# Development image: CUDA, Python, UCX (from the ucxx wheels) and an editable install of sidecar
# with the `dev` and `ucx` extras.
#
# Build from the repository root:
#   docker build -f docker/dev.Dockerfile -t sidecar-dev .
# Run the demo, or the tests with your checkout mounted over the image's copy:
#   docker run --rm --gpus all --ipc=host sidecar-dev sidecar demo
#   docker run --rm --gpus all --ipc=host -v "$PWD":/src sidecar-dev pytest
#
# Shared memory: the localhost transport's pool is an anonymous memfd, which Docker's 64 MiB
# /dev/shm does not limit. UCX's shared-memory transports between processes on one host do use
# /dev/shm, and CUDA IPC needs a shared IPC namespace: pass --ipc=host (or at least
# --shm-size=8g for UCX). `sidecar doctor` reports what it sees.
# UCX: no system UCX is needed; the `ucx` extra installs ucxx and the libucx wheel it links against.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

WORKDIR /src
# Dependencies first, so that editing the source does not reinstall torch.
COPY pyproject.toml README.md ./
COPY sidecar_core/ sidecar_core/
COPY transports/ transports/
COPY serializers/ serializers/
RUN pip install "torch==${TORCH_VERSION}" && pip install -e '.[dev,ucx]'

# The rest of the checkout: tests (with the example plugins they install), docs and benchmarks.
COPY tests/ tests/
COPY docs/ docs/
COPY benchmarks/ benchmarks/
RUN pip install -e tests/plugins/sidecar-example-transport -e tests/plugins/sidecar-example-serializer

CMD ["sidecar", "doctor"]
