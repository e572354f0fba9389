# The gateway image: `sloserve gateway` (gRPC + OpenAI HTTP), slim Python, no vLLM or torch.
#   docker build -f docker/gateway.Dockerfile -t REGISTRY/sloserve-gateway:0.1.0 .
# The gateway finds replicas through EndpointSlices (--k8s-service), which needs the
# `kubernetes` package only for kubeconfig files; in a pod it uses the service account.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1
WORKDIR /opt/sloserve
COPY pyproject.toml README.md ./
COPY sloserve ./sloserve
COPY replica ./replica
COPY gateway ./gateway
COPY operator ./operator
RUN pip install --no-cache-dir . \
    && sloserve --help > /dev/null
# Not root: the gateway binds ports above 1024 only.
USER 65532:65532
EXPOSE 50050 8000 9500
ENTRYPOINT ["sloserve"]
CMD ["gateway", "--help"]
