# The replica image: `sloserve replica` on CUDA vLLM. What the operator's replica pods run
# (command ["sloserve"], args ["replica", ...]); the model comes from a volume or the hub.
#   docker build -f docker/replica.Dockerfile -t REGISTRY/sloserve-replica:0.1.0 .
# The base already holds CUDA, PyTorch and vLLM 0.32.0 (the version pyproject's `gpu` extra
# pins); installing sloserve without extras keeps them as they are.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/models/.hf-cache
WORKDIR /opt/sloserve
COPY pyproject.toml README.md ./
COPY sloserve ./sloserve
COPY replica ./replica
COPY gateway ./gateway
COPY operator ./operator
# The vLLM base image runs `vllm serve` as its entrypoint; ours is the sloserve CLI.
RUN pip install --no-cache-dir . \
    && sloserve --help > /dev/null
EXPOSE 50051 9400
ENTRYPOINT ["sloserve"]
CMD ["replica", "--help"]
