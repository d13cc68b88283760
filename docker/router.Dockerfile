# syntax=docker/dockerfile:1
# The vllm-llmd router (no torch, no vLLM): `vllm-llmd router` with Kubernetes discovery and gateway mode.
#   docker build -f docker/router.Dockerfile -t vllm-llmd/router:0.1.0 .
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
# the k8s extra: the Kubernetes client discovery uses; gateway: grpcio and Envoy's protos for
# gateway mode (`router --ext-proc`, docs/gateway.md)
RUN pip install --no-cache-dir "$(ls /wheels/vllm_llmd-*.whl)[k8s,gateway]" && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home router
USER 10001
EXPOSE 8000 9002
ENTRYPOINT ["vllm-llmd"]
CMD ["router", "--config", "/etc/vllm-llmd/router.yaml"]
