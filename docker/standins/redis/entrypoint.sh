#!/bin/sh
# Like the official image: redis-server with no config file listens on every address with
# protected mode off (the compose network is its only way in).
set -eu
if [ "$1" = redis-server ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
