#!/usr/bin/env bash
# What a new user gets from the package: packs the tree as a fresh clone has it (tracked and new
# files, none of the build's outputs), installs the tarball with `npm install -g` into a temporary
# prefix, and runs every command of the installed uffd on a small image it snapshots itself. With
# UFFD_CHECK_NPX=1 it also runs the tarball through npx (a second install: +~75 s for zstd-napi's
# build). Run by .ci/run; needs network access to the npm registry (or its packages in npm's cache).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d /tmp/uffd-package.XXXXXX)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
step() { echo "== package: $* ($((SECONDS - started)) s)"; }
fail() { echo "package check failed: $*" >&2; exit 1; }

# The files of a clone (tracked ones still present, and new ones not ignored): no dist/, no
# native/build/, no manifest, so prepack must build them. Its node_modules is the tree's own,
# since packing needs the dev tools (tsc, oclif), not a fresh install of them.
step "copying the clone's files"
mkdir "$work/src" "$work/run"
git ls-files -z --cached --others --exclude-standard -- ':(exclude)node_modules' | tar -c --null -T - --ignore-failed-read 2>/dev/null | tar -x -C "$work/src"
ln -s "$repo/node_modules" "$work/src/node_modules"

step "npm pack"
(cd "$work/src" && npm pack --silent --pack-destination "$work" >/dev/null)
tarball=$(echo "$work"/uffd-*.tgz)
[ -f "$tarball" ] || fail "npm pack wrote no tarball"
listing=$(tar -tzf "$tarball")
for want in package/bin/run.js package/dist/commands/stats.js package/dist/bundle/cli-resume-entry.js package/oclif.manifest.json package/native/Makefile \
  package/native/libuffd_fill.c package/native/libuffd_crc.c package/native/libuffd_digest.c package/native/libuffd_preread.c package/scripts/build-native.sh; do
  grep -qx "$want" <<<"$listing" || fail "the tarball lacks ${want#package/}"
done
if grep -E '^package/(native/build/|native/(fc_client|kvm_vmm|baseline_handler|abi_dump|copy_floor|lazy_mm_ops|memory_pattern)\.c|src/|test/|bench/|bin/dev\.js)' <<<"$listing"; then
  fail "the tarball holds the files above: built binaries, test programs or sources users do not run"
fi

step "npm install -g $(basename "$tarball") into a temporary prefix"
prefix=$work/prefix
npm install -g --prefix "$prefix" --no-audit --no-fund --loglevel=error "$tarball" >/dev/null
installed=$prefix/lib/node_modules/uffd
for lib in libuffd_fill.so libuffd_crc.so libuffd_digest.so libuffd_preread.so; do [ -f "$installed/native/build/$lib" ] || fail "the install did not build native/build/$lib"; done
[ "$(ls "$installed/native/build")" = "$(printf 'libuffd_crc.so\nlibuffd_digest.so\nlibuffd_fill.so\nlibuffd_preread.so')" ] || fail "the install built more than the libraries: $(ls "$installed/native/build")"

# Every command, from outside the repository, with the installed binary first on PATH.
run_commands() {
  local uffd=$1
  cd "$work/run"
  rm -f ./*
  "$uffd" --version | grep -q '^uffd/' || fail "$uffd --version"
  "$uffd" working-set --help | grep -q "working-set merge" || fail "$uffd working-set --help does not list working-set merge"
  # 4 MiB: zero pages, text-like pages and random pages.
  node -e '
    const crypto = require("node:crypto")
    const image = Buffer.alloc(4 << 20)
    for (let p = 0; p < 1024; p++) {
      if (p % 3 === 0) continue
      const page = p % 3 === 1 ? Buffer.from(`page ${p} `.repeat(512)) : crypto.randomBytes(4096)
      page.copy(image, p * 4096, 0, 4096)
    }
    require("node:fs").writeFileSync("guest.mem", image)'
  "$uffd" snapshot --mem-file guest.mem -o guest.uffd --chunk-size 64K >/dev/null || fail "$uffd snapshot"
  "$uffd" stats guest.uffd | grep -q '^zero pages' || fail "$uffd stats"
  [ "$("$uffd" stats guest.uffd --json | node -p 'JSON.parse(require("fs").readFileSync(0)).zeroPages')" = 342 ] || fail "$uffd stats --json: zeroPages"
  "$uffd" verify guest.uffd --against guest.mem >/dev/null || fail "$uffd verify"
  # Two recordings of the set, as `resume --record` writes them (a resume needs a client, which
  # the package does not ship), for the snapshot's header checksum.
  local crc
  crc=$(node --input-type=module -e "
    const {SnapshotReader} = await import('$installed/dist/snapshot/reader.js')
    console.log(SnapshotReader.open('guest.uffd').header.headerCrc)")
  for run in 1 2; do
    echo "{\"kind\":\"uffd-working-set\",\"version\":1,\"snapshot\":{\"logicalSize\":4194304,\"pageSize\":4096,\"headerCrc\":$crc},\"runs\":1,\"pages\":[7,1,$((100 + run))],\"firstTouchMs\":[0,1,2]}" >"run$run.ws"
  done
  "$uffd" working-set merge run1.ws run2.ws --mode union -o guest.ws >/dev/null || fail "$uffd working-set merge"
  "$uffd" working-set attach guest.uffd guest.ws >/dev/null || fail "$uffd working-set attach"
  "$uffd" verify guest.uffd --against guest.mem >/dev/null || fail "$uffd verify after attach"
  "$uffd" stats guest.uffd | grep -q '^working set' || fail "$uffd stats after attach"
  # resume starts its fault loop and decoders (workers, koffi, the native libraries) and times out
  # without a client: TIMEOUT, exit 1.
  local status=0 out
  out=$("$uffd" resume guest.uffd --socket "$work/run/uffd.sock" --timeout 1 --json 2>/dev/null) || status=$?
  [ "$status" = 1 ] && grep -q '"TIMEOUT"' <<<"$out" || fail "$uffd resume without a client: exit $status, $out"
  # The same with 150 file descriptors: the resume path is bundled (scripts/bundle.mjs), so
  # Node's module loader does not run out of them (EMFILE) opening module files.
  status=0
  out=$(ulimit -n 150 && "$uffd" resume guest.uffd --socket "$work/run/uffd.sock" --timeout 1 --json 2>/dev/null) || status=$?
  [ "$status" = 1 ] && grep -q '"TIMEOUT"' <<<"$out" || fail "$uffd resume with RLIMIT_NOFILE 150: exit $status, $out"
}

step "running the installed uffd"
[ -x "$prefix/bin/uffd" ] || fail "npm install -g made no bin/uffd"
(PATH="$prefix/bin:$PATH" run_commands uffd)
# Loaded, not only built: the library's entry points are there.
node --input-type=module -e "
  const libc = await import('$installed/dist/sys/libc.js')
  if (typeof libc.fillBlock !== 'function') { console.error('native/build/libuffd_fill.so does not load'); process.exit(1) }" || fail "the installed libuffd_fill"

if [ "${UFFD_CHECK_NPX:-0}" = 1 ]; then
  step "npx --package $(basename "$tarball") uffd"
  # A cache of its own, so npx installs the tarball afresh and runs its install script.
  export npm_config_cache=$work/npx-cache
  (run_commands "$(npx --yes --package "$tarball" -c 'command -v uffd')")
  unset npm_config_cache
fi
step "ok"
