#!/usr/bin/env bash
# One command from a bare Debian/Ubuntu machine (as root) to a running netisolate:
#   bash scripts/bootstrap.sh demo   install, then run `netisolate demo` (the main job)
#   bash scripts/bootstrap.sh test   install, then ruff + mypy --strict + the whole test suite
#   bash scripts/bootstrap.sh test -m realnode   ... only the tests on the real containerd node
# It installs the system packages the kernel-facing parts use, a venv in .venv and the project.
set -euo pipefail
cd "$(dirname "$0")/.."

# nftables/iptables: both backends; socat: listeners/clients under other UIDs in tests and the demo;
# iproute2: netns/veth; conntrack: inspecting state in tests; util-linux: setpriv/nsenter;
# python3: the system interpreter runs the stand-in container processes under other UIDs;
# gcc + libc6-dev: also the static CNI plugin (cni/netisolate-cni.c).
# containerd runc containernetworking-plugins busybox-static gcc: the real node the tests run pods
# on (tests/realnode/: CRI, runc, CNI bridge; its pause and toolbox images are built locally);
# buildah debootstrap: the project's image, built without Docker (scripts/build-image.sh) for it.
APT_PACKAGES=(nftables iptables socat iproute2 conntrack util-linux procps python3 python3-venv
              containerd runc containernetworking-plugins busybox-static gcc libc6-dev buildah debootstrap)
mode=${1:-test}

if [[ $(id -u) -ne 0 ]]; then
  echo "bootstrap: run as root (sudo bash scripts/bootstrap.sh $mode): it installs packages and the" \
       "demo/tests create network namespaces" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# (this image's pip config names local wheel folders that may be absent: drop those warnings)
quiet_pip() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip install -q --upgrade pip >/dev/null
quiet_pip install -q -e '.[test]'
# The chained CNI plugin: one static C file, libc only (the tests exec this build).
mkdir -p build
cc -O2 -static -o build/netisolate-cni cni/netisolate-cni.c

case "$mode" in
  demo)
    exec .venv/bin/netisolate demo
    ;;
  test)
    # the real node's CRI client: messages and stubs from our runtime.v1 subset (not committed)
    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
      tests/realnode/cri.proto
    .venv/bin/ruff check netisolate tests bench e2e
    .venv/bin/ruff format --check netisolate tests bench e2e
    .venv/bin/mypy
    set +e
    .venv/bin/pytest -q -p no:cacheprovider "${@:2}"
    code=$?
    set -e
    if [[ $code -eq 5 ]]; then
      echo "bootstrap: pytest collected no tests: that is a failure here" >&2
      exit 1
    fi
    exit $code
    ;;
  *)
    echo "usage: bash scripts/bootstrap.sh demo|test [pytest args...]" >&2
    exit 2
    ;;
esac
