# syntax=docker/dockerfile:1
# vLLM's CUDA image with the vllm-llmd plugin (KV events, LLMDConnector) and NIXL.
#   docker build -f docker/vllm-cuda.Dockerfile -t vllm-llmd/vllm-cuda:0.1.0 .
# The plugin supports vLLM 0.32.x (pyproject's `cuda` extra). The base image already carries vLLM,
# torch and CUDA; installing the plain package (no extra) adds only the plugin's small
# dependencies. (Not built in this project's CI: there is no container daemon and no GPU there.)
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vllm_llmd ./vllm_llmd
COPY connectors ./connectors
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${VLLM_IMAGE}
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/vllm_llmd-*.whl nixl-cu12==1.5.1 \
    && pip install --no-cache-dir --no-deps nixl==1.5.1 \
    && rm -rf /wheels \
    && python3 -c "import vllm, vllm_llmd.connectors"
EXPOSE 8000 5557 5558 5600
# the base image's entrypoint (`vllm serve`) is kept: container args are vLLM's arguments
