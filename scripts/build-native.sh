#!/bin/sh
# The package's install script: builds native/'s shared libraries (libuffd_fill, libuffd_crc) on
# the machine that runs them. The package ships their C sources, not binaries built elsewhere: a
# library built against another machine's glibc may not load, and the program would fall back
# to its slower paths without saying why. The test programs of native/ are not shipped.
set -eu
cd "$(dirname "$0")/.."
# make's own default compiler is cc; CC overrides it, as for make itself.
compiler=${CC:-cc}
missing=
command -v "$compiler" >/dev/null 2>&1 || missing="a C compiler ($compiler)"
command -v make >/dev/null 2>&1 || missing="${missing:+$missing and }make"
if [ -n "$missing" ]; then
  echo "uffd: installing needs $missing to build native/libuffd_fill.so, native/libuffd_crc.so, native/libuffd_digest.so and native/libuffd_preread.so;" >&2
  echo "uffd: install gcc and make (Debian/Ubuntu: apt-get install gcc make), then install uffd again" >&2
  exit 1
fi
make -s -C native libs
