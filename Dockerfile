# One image for the agent and the webhook.
#   docker build -t ghcr.io/netisolate/netisolate:0.1.0 .
# Stage 1 builds the wheel (and the wheels it needs), stage 2 the static CNI plugin; the last stage
# installs them with no compilers.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY netisolate ./netisolate
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# The chained CNI plugin runs on the host, which may have no Python: one static C binary.
FROM debian:12-slim AS cni
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY cni/netisolate-cni.c /src/
RUN cc -O2 -static -o /netisolate-cni /src/netisolate-cni.c

FROM python:3.11-slim
LABEL org.opencontainers.image.title="netisolate" \
      org.opencontainers.image.description="Container-level network isolation for Kubernetes pods: node agent and admission webhook" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/netisolate/netisolate"
# nft and iptables-legacy-restore/-save are what the two backends run inside pod namespaces.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=cni /netisolate-cni /usr/local/lib/netisolate/netisolate-cni
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels netisolate && rm -rf /wheels \
 && netisolate --help > /dev/null
# The webhook runs as this user; the agent's DaemonSet runs as 0 with three named capabilities.
USER 65532:65532
ENTRYPOINT ["netisolate"]
CMD ["--help"]
