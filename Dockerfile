# One image for the agent and the webhook.
# image: ghcr.io/netisolate/netisolate:0.1.0
#   docker build -t ghcr.io/netisolate/netisolate:0.1.0 .      (where a Docker engine runs)
#   sudo bash scripts/build-image.sh                           (no Docker: buildah, a local base)
# The base names its Debian release so that the local stand-in (debootstrap of that release) is the
# same system the official image is.
#
# build:   the project and its dependencies into a venv (pip, build isolation, sources stay here)
# cni:     the chained CNI plugin, one static C binary (the host that runs it may have no Python)
# runtime: the base + nft/iptables + that venv, minus what only installs software (pip, setuptools,
#          apt lists)
# final:   the runtime's files as one layer: what is deleted above is gone, not hidden by whiteouts
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY netisolate ./netisolate
# --without-pip: the image runs netisolate, it never installs anything. No kubernetes client:
# netisolate speaks to the API server itself (the `kubernetes` extra is for kubeconfigs with
# auth-provider plugins, which the agent and the webhook, in-cluster, never have).
RUN python3 -m venv --without-pip /opt/netisolate \
 && pip --python /opt/netisolate/bin/python install --no-cache-dir --no-compile . \
 && /opt/netisolate/bin/python -m compileall -q -j 0 /opt/netisolate/lib

# On the same base as the others, so there is one base image to fetch (or stand in for).
FROM python:3.11-slim-bookworm AS cni
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev
COPY cni/netisolate-cni.c /src/
RUN cc -O2 -static -o /netisolate-cni /src/netisolate-cni.c

FROM python:3.11-slim-bookworm AS runtime
# nft and iptables-legacy-restore/-save are what the two backends run inside pod namespaces.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
 && pip uninstall -q -y --root-user-action=ignore pip setuptools wheel \
 && rm -rf /root/.cache
COPY --from=build /opt/netisolate /opt/netisolate
# the agent copies it into the node's CNI bin dir (daemonset/base/agent.yaml)
COPY --from=cni /netisolate-cni /usr/local/lib/netisolate/netisolate-cni

FROM scratch
COPY --from=runtime / /
LABEL org.opencontainers.image.title="netisolate" \
      org.opencontainers.image.description="Container-level network isolation for Kubernetes pods: node agent and admission webhook" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/netisolate/netisolate"
ENV PATH=/opt/netisolate/bin:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1
RUN netisolate --help > /dev/null && nft --version > /dev/null && iptables-legacy-restore --version > /dev/null \
 && echo '{"cniVersion": "1.0.0"}' | CNI_COMMAND=VERSION /usr/local/lib/netisolate/netisolate-cni > /dev/null
# The webhook runs as this user; the agent's DaemonSet runs as 0 with its named capabilities.
USER 65532:65532
ENTRYPOINT ["netisolate"]
CMD ["--help"]
