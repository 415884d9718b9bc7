#!/usr/bin/env bash
# The end-to-end suite on kind. Needs Docker, kind and kubectl; CI on this project's machines has
# no Docker engine and does not run it (the same scenarios run there on the local node harness).
#   bash e2e/run.sh            KEEP_CLUSTER=1 bash e2e/run.sh   (leave the cluster for debugging)
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is required (see e2e/README.md)" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e: no Docker engine is reachable" >&2; exit 2; }
python3 -c 'import netisolate, pytest, yaml' 2>/dev/null \
  || { echo "e2e: install the project first: pip install -e '.[test]'" >&2; exit 2; }

CLUSTER=netisolate-e2e
IMAGE=ghcr.io/netisolate/netisolate:0.1.0
ARTIFACTS=${ARTIFACTS:-e2e/artifacts}
export E2E_KUBECONFIG=${E2E_KUBECONFIG:-$(mktemp)}

collect() {
  local code=$?
  if [[ $code -ne 0 ]]; then
    mkdir -p "$ARTIFACTS"
    kubectl --kubeconfig "$E2E_KUBECONFIG" get events -A --sort-by=.lastTimestamp > "$ARTIFACTS/events.txt" 2>&1 || true
    kubectl --kubeconfig "$E2E_KUBECONFIG" -n netisolate-system logs \
      -l 'app.kubernetes.io/name in (netisolate-agent,netisolate-webhook)' \
      --all-containers --prefix --tail=-1 > "$ARTIFACTS/netisolate.log" 2>&1 || true
    kind export logs "$ARTIFACTS/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
    echo "e2e: failed; logs in $ARTIFACTS" >&2
  fi
  [[ "${KEEP_CLUSTER:-0}" == 1 ]] || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  exit $code
}
trap collect EXIT

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then  # left by KEEP_CLUSTER=1
  kind export kubeconfig --name "$CLUSTER" --kubeconfig "$E2E_KUBECONFIG"
else
  kind create cluster --name "$CLUSTER" --config e2e/kind-config.yaml --kubeconfig "$E2E_KUBECONFIG" --wait 120s
fi
# No provenance attestation, and loaded from an archive: `kind load docker-image` fails on images
# with attestations from Docker's containerd image store ("content digest not found").
docker build --provenance=false -t "$IMAGE" .
archive=$(mktemp --suffix=.tar)
docker save -o "$archive" "$IMAGE"
kind load image-archive "$archive" --name "$CLUSTER"
rm -f "$archive"
kubectl --kubeconfig "$E2E_KUBECONFIG" apply -k daemonset/
kubectl --kubeconfig "$E2E_KUBECONFIG" -n netisolate-system rollout status daemonset/netisolate-agent --timeout=180s
kubectl --kubeconfig "$E2E_KUBECONFIG" -n netisolate-system rollout status deployment/netisolate-webhook --timeout=180s
# Ready pods are not yet a webhook the API server can call (caBundle, endpoints): with
# failurePolicy Fail, wait until a server-side dry run passes through it.
for attempt in $(seq 60); do
  kubectl --kubeconfig "$E2E_KUBECONFIG" create namespace e2e-webhook-probe --dry-run=server >/dev/null 2>&1 && break
  [[ $attempt == 60 ]] && { echo "e2e: the webhook never answered the API server" >&2; exit 1; }
  sleep 2
done
python3 -m pytest -q e2e/ -p no:cacheprovider
