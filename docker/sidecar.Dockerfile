# Runtime image: Python, torch and sidecar with the ucx extra, no build tools or tests. Use it as
# the base of a serving process that talks to other ranks through sidecar.
#
# Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t sidecar .
# Check what a container sees (settings, transport, shared memory, CUDA):
#   docker run --rm --gpus all --ipc=host -e SIDECAR_TRANSPORT=ucx sidecar
#
# Run containers of ranks on one host with --ipc=host: CUDA IPC needs a shared IPC namespace, and
# UCX's shared-memory transports need more than Docker's default 64 MiB of /dev/shm (at least
# --shm-size=8g). The localhost transport's pool is an anonymous memfd that /dev/shm does not limit.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --upgrade pip build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar_core/ sidecar_core/
COPY transports/ transports/
COPY serializers/ serializers/
RUN /opt/build/bin/python -m build --wheel --outdir /dist

FROM ${CUDA_IMAGE}
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=build /dist/ /tmp/dist/
RUN pip install "torch==${TORCH_VERSION}" \
    && pip install "$(ls /tmp/dist/sidecar-*.whl)[ucx]" \
    && rm -rf /tmp/dist

RUN useradd --create-home sidecar
USER sidecar
WORKDIR /home/sidecar
CMD ["sidecar", "doctor"]
