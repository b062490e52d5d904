#!/usr/bin/env bash
# Installs CRIU >= 4.1 as /usr/local/sbin/criu, built from the Debian registry's source package.
#
# Why: Debian 12 ships criu 3.17, whose `criu check` fails on kernels >= 6.13 ("Unexpected rt vDSO
# area bounds"); 4.1+ works. The 4.1.1 source is taken from the trixie suite's deb-src through apt
# with a private sources list and private index directory, so the system's apt configuration is
# never touched, and apt checks the tarball against the signed index.
#
# Idempotent and cached:
#   1. a criu >= 4.1 on PATH or in /usr/local/sbin that passes `criu check`: nothing to do;
#   2. a binary built earlier on this machine (in $CACHE_DIR): copied into place;
#   3. otherwise: install the build dependencies, fetch the source, `make criu`, install, cache.
# Needs root (apt-get, /usr/local/sbin). Only Debian's registry is reached, through apt-get.
set -euo pipefail

CRIU_VERSION=4.1.1
CRIU_DEB_VERSION=4.1.1-1
MIN_MAJOR=4
MIN_MINOR=1
SUITE=trixie
# The Debian archive this machine's apt already uses (the main archive of its bookworm entries),
# so the script reaches exactly the registry the system is configured for.
debian_mirror() {
  local uri
  uri=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null | grep -v -- '-security' | head -n 1)
  [ -n "$uri" ] || uri=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | awk '{print $2}' | grep -v -- '-security' | head -n 1)
  [ -n "$uri" ] || die "cannot find a Debian archive in this machine's apt sources"
  echo "${uri%/}"
}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
DEST=/usr/local/sbin/criu
CACHE_DIR="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/uffd/criu-$CRIU_VERSION"

# Build dependencies (from bookworm). The *-dev packages pull in the runtime libraries the binary
# links against, so the same list also repairs a cached binary whose libraries are missing.
BUILD_DEPS=(build-essential pkg-config xz-utils libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  python3-protobuf libnl-3-dev libnl-route-3-dev libcap-dev libnet1-dev libaio-dev uuid-dev libbsd-dev libgnutls28-dev)

started=$(date +%s)
say() { printf 'install-criu: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}
elapsed() { echo "$(($(date +%s) - started)) s"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and $DEST)"

# Prints the version of the criu binary $1 ("4.1.1"), or nothing.
criu_version() { "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p'; }

# True if the criu binary $1 is new enough and `criu check` passes on this kernel.
criu_works() {
  local bin=$1 version major minor
  [ -x "$bin" ] || return 1
  version=$(criu_version "$bin")
  [ -n "$version" ] || return 1
  IFS=. read -r major minor _ <<<"$version"
  if [ "$major" -lt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "${minor:-0}" -lt "$MIN_MINOR" ]; }; then
    say "$bin is criu $version, older than $MIN_MAJOR.$MIN_MINOR"
    return 1
  fi
  "$bin" check >/dev/null 2>&1 || {
    say "$bin (criu $version) fails 'criu check'"
    return 1
  }
}

# Verifies the installed binary, including the userfaultfd features the lazy-pages path needs.
verify() {
  say "verifying $DEST: criu $(criu_version "$DEST")"
  "$DEST" check || die "'$DEST check' failed"
  "$DEST" check --feature uffd || die "this kernel lacks userfaultfd ('criu check --feature uffd' failed)"
  "$DEST" check --feature uffd-noncoop || die "this kernel lacks non-cooperative userfaultfd ('criu check --feature uffd-noncoop' failed)"
}

# Installs whichever of the given packages are missing (apt-get update first, once, if needed).
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install failed for: ${missing[*]}"
}

# 1. Already installed?
for candidate in "$(command -v criu || true)" "$DEST"; do
  if [ -n "$candidate" ] && criu_works "$candidate"; then
    say "criu $(criu_version "$candidate") at $candidate passes 'criu check': nothing to do ($(elapsed))"
    exit 0
  fi
done

mkdir -p "$CACHE_DIR"
# One install at a time per cache (concurrent CI jobs on one machine).
exec 9>"$CACHE_DIR/.lock"
flock 9

# 2. Built before on this machine?
if [ -x "$CACHE_DIR/criu" ]; then
  if ldd "$CACHE_DIR/criu" | grep -q 'not found'; then
    say "cached binary lacks libraries: installing dependencies"
    apt_install "${BUILD_DEPS[@]}"
  fi
  if criu_works "$CACHE_DIR/criu"; then
    say "installing cached $CACHE_DIR/criu -> $DEST"
    install -m 0755 "$CACHE_DIR/criu" "$DEST"
    verify
    say "done from cache ($(elapsed))"
    exit 0
  fi
  say "cached binary does not work here: rebuilding"
fi

# 3. Build from source.
apt_install "${BUILD_DEPS[@]}"

work=$(mktemp -d /tmp/install-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/apt/lists/partial" "$work/apt/parts"
echo "deb-src [signed-by=$KEYRING] $(debian_mirror) $SUITE main" >"$work/apt/sources.list"
# Private sources list, source parts and index directory; binary caches off, so nothing under
# /etc/apt or /var/lib/apt (nor apt's cache files) changes. Downloads land in root-only temporary
# directories, which apt's unprivileged _apt download user cannot write: download as root.
APT_PRIVATE=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=$work/apt/parts"
  -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Sandbox::User=root")

say "fetching the $SUITE source index"
apt-get "${APT_PRIVATE[@]}" update -qq || die "apt-get update of the private $SUITE deb-src list failed"
say "downloading criu_$CRIU_VERSION.orig.tar.xz (criu $CRIU_DEB_VERSION source)"
# Only the upstream tarball is needed (the Debian packaging files are not, and may be gone from the
# pool): take its URI and SHA256 from the signed index, and let apt's own downloader fetch and
# check it.
tarball_name="criu_$CRIU_VERSION.orig.tar.xz"
uris=$(apt-get "${APT_PRIVATE[@]}" source --print-uris -qq "criu=$CRIU_DEB_VERSION") ||
  die "criu $CRIU_DEB_VERSION is not in $SUITE's source index (has the suite moved on? update CRIU_DEB_VERSION)"
read -r uri _ _ hash < <(grep -F " $tarball_name " <<<"$uris") || die "no $tarball_name in the source package criu $CRIU_DEB_VERSION"
tarball="$work/$tarball_name"
/usr/lib/apt/apt-helper "${APT_PRIVATE[@]}" download-file "${uri//\'/}" "$tarball" "$hash" >/dev/null ||
  die "downloading $tarball_name failed (or its SHA256 did not match the index)"

tar -xJf "$tarball" -C "$work"
src="$work/criu-$CRIU_VERSION"
[ -d "$src" ] || die "unexpected tarball layout: no criu-$CRIU_VERSION/ in $(basename "$tarball")"
say "building criu $CRIU_VERSION (make -j$(nproc) criu; log in $CACHE_DIR/build.log)"
# Use the system python3 (for python3-protobuf), not a user-local interpreter that may shadow it.
if ! PATH="/usr/sbin:/usr/bin:/sbin:/bin" make -C "$src" -j"$(nproc)" criu >"$CACHE_DIR/build.log" 2>&1; then
  tail -n 30 "$CACHE_DIR/build.log" >&2
  die "criu build failed (full log: $CACHE_DIR/build.log)"
fi
built="$src/criu/criu"
[ -x "$built" ] || die "the build produced no $built"
criu_works "$built" || die "the freshly built criu fails 'criu check' on this kernel"

install -m 0755 "$built" "$CACHE_DIR/criu"
install -m 0755 "$built" "$DEST"
verify
say "built and installed criu $CRIU_VERSION ($(elapsed)); cached in $CACHE_DIR"
