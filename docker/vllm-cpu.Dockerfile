# syntax=docker/dockerfile:1
# vLLM's CPU build (vllm-cpu) with the vllm-llmd plugin and NIXL (UCX): the engine this project
# tests on. The same recipe as scripts/setup-env.sh.
#   docker build -f docker/vllm-cpu.Dockerfile -t vllm-llmd/vllm-cpu:0.1.0 .
# (Not built in this project's CI: there is no container daemon there. CI lints it with hadolint.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vllm_llmd ./vllm_llmd
COPY connectors ./connectors
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /wheels
# CPU torch first, pinned, from PyTorch's CPU index (PyPI's default torch is a CUDA build); then
# vLLM's CPU build and the plugin; NIXL's CUDA-12 wheel works on host memory without CUDA, and
# `nixl` itself only adds a second backend we do not need.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir "$(ls /wheels/vllm_llmd-*.whl)[cpu]" nixl-cu12==1.5.1 \
    && pip install --no-cache-dir --no-deps nixl==1.5.1 \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && rm -rf /wheels \
    && python -c "import vllm, vllm_llmd.connectors"
EXPOSE 8000 5557 5558 5600
# vllm-cpu's `vllm` console script looks up the distribution name `vllm` and fails: run the module
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
