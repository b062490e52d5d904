#!/usr/bin/env bash
# The quick start: snapshot a memory-like image, show what the snapshot holds, verify it, then
# resume it into a real client (native/build/fc_client, which behaves like Firecracker restoring a
# VM) that touches every page in random order and checks every byte. Needs a built tree
# (npm run build); the resume step needs root (userfaultfd for kernel-mode faults).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/uffd-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
uffd() { node bin/run.js "$@"; }

node fixtures/make-demo-image.mjs "$work/guest.mem" 64
echo "== uffd snapshot"
uffd snapshot --mem-file "$work/guest.mem" -o "$work/guest.uffd"
echo "== uffd stats"
uffd stats "$work/guest.uffd"
echo "== uffd verify"
uffd verify "$work/guest.uffd" --against "$work/guest.mem"

if [ "$(id -u)" != 0 ]; then
  echo "== uffd resume skipped: serving faults of another process's kernel-mode accesses needs root"
  exit 0
fi
echo "== uffd resume (fc_client touches every page in random order and verifies it)"
uffd resume "$work/guest.uffd" --socket "$work/uffd.sock" --ready-file "$work/ready" --stats-file "$work/run.json" &
resume=$!
for _ in $(seq 200); do [ -e "$work/ready" ] && break; sleep 0.05; done
native/build/fc_client --socket "$work/uffd.sock" --image "$work/guest.mem" --touch random --verify-all
wait "$resume"
echo "== uffd stats (of the resume)"
uffd stats "$work/run.json"
