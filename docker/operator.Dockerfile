# The operator image: `sloserve operator` (kopf), slim Python. What the chart's operator pod
# runs (command ["sloserve"], args ["--log-level=...", "operator", ...]).
#   docker build -f docker/operator.Dockerfile -t REGISTRY/sloserve-operator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1
WORKDIR /opt/sloserve
COPY pyproject.toml README.md ./
COPY sloserve ./sloserve
COPY replica ./replica
COPY gateway ./gateway
COPY operator ./operator
# kopf and the kubernetes client are in the `dev` extra today; pin them here until
# pyproject grows an `operator` extra (see docs/deploy.md).
RUN pip install --no-cache-dir . "kopf==1.45.2" "kubernetes>=37" \
    && sloserve operator --help > /dev/null
# The chart runs it as 65532 with a read-only root file system and an emptyDir on /tmp.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["sloserve"]
CMD ["operator", "--help"]
