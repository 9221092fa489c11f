#!/usr/bin/env bash
# Build .redis/ (git-ignored) in the project root: this machine's redis-server with every shared
# library ldd lists, the loader ld-linux-x86-64.so.2 and libc included, so it runs on a host that has
# no redis-server (the GPU machine) whatever that host's glibc:
#
#   .redis/ld-linux-x86-64.so.2 --library-path .redis .redis/redis-server --port P --save "" --appendonly no
#
# Also puts the redis-py wheel into .whl/ (the GPU machine lacks the Python client). Run from anywhere
# inside the repository; it ends by starting the bundled server once and pinging it.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
for p in /.redis/ /.whl/; do grep -qx "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"; done
bin=$(command -v redis-server || true)
[ -n "$bin" ] || { echo "redis-server not installed here (apt-get install redis-server)" >&2; exit 1; }
rm -rf .redis && mkdir -p .redis
cp -L "$bin" .redis/redis-server
# every resolved library (name => /path) plus the loader line (/lib64/ld-linux-x86-64.so.2 (0x...))
ldd "$bin" | awk '/=> \//{print $1, $3} /^[ \t]*\/.*ld-linux/{n=$1; sub(".*/", "", n); print n, $1}' |
  while read -r name path; do cp -L "$path" ".redis/$name"; done
[ -e .redis/ld-linux-x86-64.so.2 ] && [ -e .redis/libc.so.6 ] || { echo "loader or libc missing in .redis" >&2; exit 1; }
mkdir -p .whl
ls .whl/redis-*.whl >/dev/null 2>&1 || python3 -m pip download -q redis --no-deps -d .whl
# the bundled server must start through the bundled loader alone
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tmp=$(mktemp -d)
.redis/ld-linux-x86-64.so.2 --library-path .redis .redis/redis-server --port "$port" --bind 127.0.0.1 \
  --save "" --appendonly no --dir "$tmp" >/dev/null &
pid=$!
ok=0
for _ in $(seq 50); do
  if python3 -c "import redis; redis.Redis(port=$port).ping()" 2>/dev/null; then ok=1; break; fi
  sleep 0.1
done
kill "$pid"; wait "$pid" 2>/dev/null || true
rm -rf "$tmp"
[ "$ok" = 1 ] || { echo "bundled redis-server did not answer PING" >&2; exit 1; }
echo "bundled redis-server answered PING; what goes to the GPU machine (must stay < 64 MiB):"
du -sc .redis .whl $(ls -d .ficache 2>/dev/null) | sed 's/^/  KiB /'
