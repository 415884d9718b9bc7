#!/usr/bin/env bash
# Build the project's image on a machine without Docker and export it for containerd:
#   sudo bash scripts/build-image.sh            -> $NETISOLATE_IMAGE_CACHE/netisolate.oci.tar
#   ctr -n k8s.io images import --base-name ghcr.io/netisolate/netisolate \
#       /var/cache/netisolate-image/netisolate.oci.tar
#
# The Dockerfile is the one recipe (`docker build .` elsewhere builds the same file). Here buildah
# builds it with no registry: the Dockerfile's FROM base is replaced by a local stand-in made with
# debootstrap from this machine's own apt sources (Debian minbase + python3 and pip, as the official
# python:<version>-slim-<codename> has them), committed under the FROM name. The stand-in is cached
# under $NETISOLATE_IMAGE_CACHE (never in the repository) and in buildah's own storage.
#
# The build sees the machine's CA bundle (pip inside the build verifies PyPI's TLS with it); it is
# mounted for the build only and never becomes part of the image.
#
# Environment: NETISOLATE_IMAGE (tag, default the Dockerfile's), NETISOLATE_IMAGE_CACHE (default
# /var/cache/netisolate-image), NETISOLATE_IMAGE_REBASE=1 (make the base again).
set -euo pipefail
cd "$(dirname "$0")/.."

image=${NETISOLATE_IMAGE:-$(sed -n 's/^# *image: *//p' Dockerfile | head -1)}
cache=${NETISOLATE_IMAGE_CACHE:-/var/cache/netisolate-image}
archive="$cache/netisolate.oci.tar"
log() { echo "build-image: $*" >&2; }
die() { log "$*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (sudo bash $0): debootstrap and buildah's chroot isolation need it"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install buildah debootstrap"
done
[[ -n $image ]] || die "no '# image: <name>' line in the Dockerfile and NETISOLATE_IMAGE unset"

# The one base the Dockerfile pulls (stages named with AS, and scratch, are not bases).
mapfile -t bases < <(awk 'toupper($1) == "FROM" { stages[$4] = 1; if (!($2 in stages) && $2 != "scratch") print $2 }' Dockerfile | sort -u)
((${#bases[@]} == 1)) || die "the Dockerfile must name one base image, it names: ${bases[*]:-none}"
base=${bases[0]}
[[ $base =~ ^python:([0-9]+\.[0-9]+)-slim-([a-z]+)$ ]] ||
  die "base '$base': a local stand-in can be made only for python:<version>-slim-<debian codename>"
py_version=${BASH_REMATCH[1]}
codename=${BASH_REMATCH[2]}

# The machine's Debian sources for that release (main suite, -updates, -security), as one-line
# entries; the mirror is whatever this machine uses, read now.
apt_sources() {
  python3 - "$codename" <<'EOF'
import glob, sys
codename = sys.argv[1]
suites = {codename, f"{codename}-updates", f"{codename}-security"}
entries = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
            entries += [(uri, s, fields.get("components", ["main"])) for uri in fields.get("uris", [])
                        for s in fields.get("suites", [])]
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        continue
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words[:1] == ["deb"]:
            if words[1].startswith("["):
                while not words[1].endswith("]"):
                    del words[1]
                del words[1]
            entries.append((words[1], words[2], words[3:]))
for uri, suite, components in entries:
    if suite in suites:
        print(f"deb {uri} {suite} {' '.join(components)}")
EOF
}

# debootstrap minbase + what the official python slim image holds (python, pip, venv, CA
# certificates, netbase, tzdata), slimmed the way Debian's slim images are (no docs, man pages,
# locales, apt lists). Written to $1 as a rootfs tarball.
make_base_rootfs() {
  local out=$1 sources mirror root
  sources=$(apt_sources)
  mirror=$(awk -v s="$codename" '$3 == s { print $2; exit }' <<<"$sources")
  [[ -n $mirror ]] || die "no apt source for Debian '$codename' in /etc/apt/sources.list*: the stand-in base is built from it"
  root=$(mktemp -d /var/tmp/netisolate-base.XXXXXX)
  trap 'rm -rf "$root" "$root.log"' EXIT
  log "debootstrap $codename (minbase) from this machine's mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
    "$codename" "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; die "debootstrap failed (log above)"; }
  rm -f "$root.log"
  printf '%s\n' "$sources" >"$root/etc/apt/sources.list"
  # as in Debian's slim images: dpkg keeps no docs, man pages or locales from now on
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,info,locale,lintian}/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/* "$root"/tmp/*
  # pip and setuptools where the official image has them (/usr/local, not dpkg's), from the wheels
  # python3-venv ships; Debian's own pip refuses system-wide installs (EXTERNALLY-MANAGED).
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  chroot "$root" sh -c 'python3 "$(ls /usr/share/python-wheels/pip-*.whl)/pip" install -q --no-index \
    --no-cache-dir --root-user-action=ignore /usr/share/python-wheels/pip-*.whl /usr/share/python-wheels/setuptools-*.whl' \
    || die "pip into the stand-in base failed"
  local have
  have=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $have == "$py_version" ]] || die "Debian $codename has Python $have, the Dockerfile wants $py_version"
  tar -C "$root" --numeric-owner -cf "$out" .
  rm -rf "$root"
  trap - EXIT
}

# Put the stand-in under the FROM name into buildah's storage (from the cached tarball if any).
ensure_base() {
  if [[ ${NETISOLATE_IMAGE_REBASE:-} != 1 ]] &&
    [[ $(buildah inspect --type image --format '{{index .Docker.Config.Labels "org.netisolate.stand-in"}}' "$base" 2>/dev/null) == *"$recipe" ]]; then
    log "base $base: already in buildah's storage"
    return
  fi
  local rootfs="$cache/$(tr ':/' '__' <<<"$base")-$recipe.rootfs.tar" ctr mnt
  if [[ ${NETISOLATE_IMAGE_REBASE:-} == 1 || ! -s $rootfs ]]; then
    make_base_rootfs "$rootfs.part"
    mv "$rootfs.part" "$rootfs"
  else
    log "base $base: from the cached $rootfs"
  fi
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  tar -C "$mnt" --numeric-owner -xf "$rootfs"
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --env PYTHON_VERSION="$py_version" --cmd python3 \
    --label org.netisolate.stand-in="debootstrap $codename minbase + python3, pip; recipe $recipe" "$ctr"
  buildah commit --rm -q "$ctr" "$base" >/dev/null
  log "base $base: committed (local stand-in, $(du -sh "$rootfs" | cut -f1) uncompressed)"
}

# The stand-in is remade when the recipe above changes.
recipe=$(declare -f make_base_rootfs | sha256sum | cut -c1-12)
mkdir -p "$cache"
start=$SECONDS
ensure_base
log "building $image from Dockerfile"
previous=$(buildah images -q --filter reference="$image" 2>/dev/null || true)
buildah bud --pull=never --network host --isolation chroot --layers \
  -v /etc/ssl/certs:/etc/ssl/certs:ro -f Dockerfile -t "$image" . >&2
# the image this build replaced, untagged now: nothing needs it (the layer cache keeps its own)
if [[ -n $previous && $previous != "$(buildah images -q --filter reference="$image")" ]]; then
  buildah rmi "$previous" >/dev/null 2>&1 || true
fi
rm -f "$archive"
buildah push -q "$image" "oci-archive:$archive:$image" >&2
size=$(buildah images --format "{{.Size}}" "$image" | head -1)
log "built $image in $((SECONDS - start)) s; $size; exported to $archive"
echo "$archive"
