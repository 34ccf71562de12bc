#!/bin/sh
# The image's entrypoint: one container, one role.
#
#   serve [GUNICORN ARGS]   the web server (default): gunicorn with app/gunicorn_conf.py
#   worker [ARGS]           a job worker: `gateway jobs worker ARGS`
#   migrate                 `gateway db upgrade`: a one-off job before (re)starting replicas, never on their start
#   keys                    signing keys and the SMART session key into KEYS_DIR, once; a no-op when present
#   keys ARGS               `gateway keys ARGS` (e.g. `keys generate` to rotate)
#   anything else           `gateway ...` (`gateway --help` lists the commands)
#
# Secrets as files: DATABASE_URL_FILE=/run/secrets/x and the like are read by the service itself (app/config.py).
# Each role execs its process, so it is PID 1 and receives the container's SIGTERM itself.
set -eu

role=${1:-serve}
[ $# -gt 0 ] && shift
case "$role" in
  serve) exec gateway serve "$@" ;;
  -*) exec gateway serve "$role" "$@" ;; # options alone: gunicorn options for the default role
  worker) exec gateway jobs worker "$@" ;;
  migrate) exec gateway db upgrade "$@" ;;
  keys)
    [ $# -gt 0 ] && exec gateway keys "$@"
    keys_dir=${KEYS_DIR:-${INSTANCE_PATH:-/var/lib/gateway}/keys}
    # A secret mounted read-only already holds the keys: writing (even the lock file) would fail, and is not needed.
    if [ -s "$keys_dir/keys.json" ] && [ ! -w "$keys_dir" ]; then
      echo "gateway-entrypoint: keys in read-only $keys_dir; nothing generated"
      exit 0
    fi
    exec gateway keys generate --if-missing
    ;;
  *) exec gateway "$role" "$@" ;;
esac
