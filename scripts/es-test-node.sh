#!/usr/bin/env bash
# A throwaway single-node Elasticsearch for vrec's live tests and benchmark (not for real data).
#
#   bash scripts/es-test-node.sh start    # fetch (once), start, wait for health; prints the URL
#   bash scripts/es-test-node.sh status   # prints the URL and exits 0 when the node answers
#   bash scripts/es-test-node.sh stop     # stops it (by its pid) and deletes its data
#
# It runs Elastic's minimal integration-test distribution
# (org.elasticsearch.distribution.integ-test-zip:elasticsearch, Elastic License, fetched from Maven
# Central at test time and never committed): no bundled JDK, no ML, no `GET /`. Listens on
# 127.0.0.1 only, on a free port, security off, 1 GB heap.
#
# Settings (environment):
#   VREC_ES_VERSION        distribution version (default 9.5.0: the newest 9.x Maven Central serves
#                          that is >= the pinned client's 9.5 minor; 9.5.1 is not published there)
#   VREC_ES_CACHE          where the zip is unpacked (default ~/.cache/vrec/es; /var/cache/vrec/es
#                          as root, because the node's user cannot enter /root)
#   VREC_ES_NODE_DIR       the node's config, data, logs, pid and URL (default: one per checkout
#                          under the cache, so worktrees do not share a node)
#   VREC_ES_START_TIMEOUT  seconds to wait for /_cluster/health (default 180)
#   ES_JAVA_HOME           a Java 21+ (default: the first one found among JAVA_HOME, java on PATH,
#                          /usr/lib/jvm/*)
#   VREC_ES_USER_NAME      the unprivileged user the node runs as when started by root (default
#                          vrec-es, created as a system user if missing); Elasticsearch refuses root
#
# Exit status: 0 ok, 1 the node failed to start, 3 it cannot be had here (no Java 21+, no Maven,
# artifact not served); the last line of stderr says why.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VERSION=${VREC_ES_VERSION:-9.5.0}
if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/vrec/es; else default_cache=${XDG_CACHE_HOME:-$HOME/.cache}/vrec/es; fi
CACHE=${VREC_ES_CACHE:-$default_cache}
NODE=${VREC_ES_NODE_DIR:-$CACHE/node-$(printf '%s' "$REPO" | md5sum | cut -c1-8)}
TIMEOUT=${VREC_ES_START_TIMEOUT:-180}
RUN_AS=${VREC_ES_USER_NAME:-vrec-es}
ARTIFACT=org.elasticsearch.distribution.integ-test-zip:elasticsearch:$VERSION:zip
ES_HOME=$CACHE/elasticsearch-$VERSION

unavailable() { echo "es-test-node: $*" >&2; exit 3; }
fail() { echo "es-test-node: $*" >&2; exit 1; }

java_major() {  # major version of the java binary $1 (0 if it does not run)
  "$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p' | head -1 | grep . || echo 0
}

find_java() {
  local candidate
  for candidate in "${ES_JAVA_HOME:-}" "${JAVA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v java || echo /nonexistent)")")")" /usr/lib/jvm/*; do
    [ -n "$candidate" ] && [ -x "$candidate/bin/java" ] || continue
    if [ "$(java_major "$candidate/bin/java")" -ge 21 ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

fetch() {  # the distribution, unpacked under $CACHE (once)
  [ -x "$ES_HOME/bin/elasticsearch" ] && return 0
  command -v mvn >/dev/null || unavailable "Maven (mvn) is not installed; it fetches $ARTIFACT (apt-get install maven)"
  local repo zip log
  repo=${VREC_M2_REPO:-$HOME/.m2/repository}  # Maven's default local repository
  zip=$repo/org/elasticsearch/distribution/integ-test-zip/elasticsearch/$VERSION/elasticsearch-$VERSION.zip
  if [ ! -f "$zip" ]; then
    echo "es-test-node: fetching $ARTIFACT with Maven (~130 MB, once)" >&2
    log=$(mvn -B -q -Dstyle.color=never dependency:get -Dartifact="$ARTIFACT" -Dtransitive=false 2>&1 | sed 's/\x1b\[[0-9;]*m//g'; exit "${PIPESTATUS[0]}") ||
      unavailable "mvn dependency:get -Dartifact=$ARTIFACT failed: $(printf '%s\n' "$log" | grep -m1 ERROR || printf '%s' "$log" | tail -1)"
    [ -f "$zip" ] || unavailable "Maven fetched $ARTIFACT but not into $repo; set VREC_M2_REPO to its local repository"
  fi
  mkdir -p "$CACHE"
  local tmp
  tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
  unzip -q "$zip" -d "$tmp" || { rm -rf "$tmp"; fail "cannot unzip $zip"; }
  chmod 755 "$tmp"
  mv -T "$tmp/elasticsearch-$VERSION" "$ES_HOME" 2>/dev/null || [ -x "$ES_HOME/bin/elasticsearch" ] || fail "cannot unpack into $ES_HOME"
  rm -rf "$tmp"
  chmod -R a+rX "$CACHE"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

healthy() {  # $1: URL
  curl -fsS --max-time 5 "$1/_cluster/health?wait_for_status=yellow&timeout=2s" >/dev/null 2>&1
}

running_pid() {
  local pid
  pid=$(cat "$NODE/run/es.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  if running_pid >/dev/null && healthy "$(cat "$NODE/url")"; then cat "$NODE/url"; return 0; fi
  stop >/dev/null 2>&1 || true
  local java_home
  java_home=$(find_java) || unavailable "no Java 21+ found (Elasticsearch $VERSION needs one; default java is $(java_major "$(command -v java || echo java)")); install one or set ES_JAVA_HOME"
  fetch
  local as=() owner
  owner=$(id -un)
  if [ "$(id -u)" = 0 ]; then  # Elasticsearch refuses root: a system user, else nobody (65534)
    if { getent passwd "$RUN_AS" || useradd --system --no-create-home --shell /usr/sbin/nologin "$RUN_AS"; } >/dev/null 2>&1 &&
       command -v runuser >/dev/null; then
      as=(runuser -u "$RUN_AS" --)
      owner=$RUN_AS
    elif command -v setpriv >/dev/null; then
      as=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
      owner=65534:65534
    else
      unavailable "running as root, and neither useradd + runuser nor setpriv can drop to an unprivileged user (Elasticsearch refuses root)"
    fi
  fi
  rm -rf "$NODE"
  mkdir -p "$NODE"/{data,logs,run/tmp}  # run/tmp: the JVM's temporary files, deleted by stop (not /tmp/elasticsearch-*)
  cp -r "$ES_HOME/config" "$NODE/config"
  # Faster start on a small box: heap not pre-touched, tiered compilation as usual.
  printf -- '-Xms1g\n-Xmx1g\n-XX:-AlwaysPreTouch\n' > "$NODE/config/jvm.options.d/vrec.options"
  chown -R "$owner" "$NODE"
  local port transport url
  port=$(free_port)
  transport=$(free_port)
  url=http://127.0.0.1:$port
  local started=$SECONDS
  env ES_JAVA_HOME="$java_home" ES_PATH_CONF="$NODE/config" ES_TMPDIR="$NODE/run/tmp" ES_JAVA_OPTS="" "${as[@]}" "$ES_HOME/bin/elasticsearch" -d -p "$NODE/run/es.pid" \
    -E cluster.name=vrec-test -E node.name=vrec-test \
    -E discovery.type=single-node -E xpack.security.enabled=false \
    -E network.host=127.0.0.1 -E http.port="$port" -E transport.port="$transport" \
    -E path.data="$NODE/data" -E path.logs="$NODE/logs" \
    -E cluster.routing.allocation.disk.threshold_enabled=false \
    -E action.destructive_requires_name=false \
    >"$NODE/run/console.log" 2>&1 || fail "Elasticsearch did not start: $(grep -m1 -E 'ERROR|Exception' "$NODE/run/console.log" || tail -1 "$NODE/run/console.log")"
  while ! healthy "$url"; do
    running_pid >/dev/null || fail "Elasticsearch exited while starting; see $NODE/logs/vrec-test.log"
    [ $((SECONDS - started)) -lt "$TIMEOUT" ] || { stop >/dev/null 2>&1 || true; fail "no healthy cluster at $url after ${TIMEOUT}s"; }
    sleep 1
  done
  echo "$url" > "$NODE/url"
  echo "es-test-node: Elasticsearch $VERSION at $url (pid $(running_pid)), healthy after $((SECONDS - started))s" >&2
  echo "$url"
}

stop() {
  local pid
  if pid=$(running_pid); then
    kill "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "es-test-node: stopped pid $pid" >&2
  fi
  rm -rf "$NODE/data" "$NODE/run" "$NODE/url"
}

status() {
  if running_pid >/dev/null && healthy "$(cat "$NODE/url")"; then cat "$NODE/url"; else echo "es-test-node: not running" >&2; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
