#!/usr/bin/env bash
# A private Docker daemon for `make compose-e2e`: no default bridge, data and sockets under a
# temporary directory, so nothing it creates outlives `stop`.
#
#   eval "$(docker/dockerd.sh start DIR)"   # prints `export DOCKER_HOST=unix://DIR/docker.sock`
#   docker/dockerd.sh stop DIR              # kills it, removes its iptables chains, restores
#                                           # net.ipv4.ip_forward and the FORWARD policy
#
# iptables stays with dockerd: with --iptables=false bridged packets between containers hit the
# FORWARD DROP policy. dockerd isolates `internal: true` networks itself (no NAT, no route out).
set -euo pipefail

cmd=${1:?usage: dockerd.sh start|stop DIR}
dir=${2:?usage: dockerd.sh start|stop DIR}

start() {
    mkdir -p "$dir/data"
    # the data root on a sparse ext4 image: removing one file at stop takes a moment, where
    # deleting the images' layers file by file took minutes; a plain folder where loop mounts fail
    truncate -s "${DPIG_DOCKERD_DISK:-40G}" "$dir/data.img" && mkfs.ext4 -q "$dir/data.img" &&
        mount -o loop "$dir/data.img" "$dir/data" || rm -f "$dir/data.img"
    cat /proc/sys/net/ipv4/ip_forward >"$dir/ip_forward.before"
    # dockerd sets the FORWARD policy to DROP when it turns forwarding on
    iptables -S FORWARD | awk '$1 == "-P" {print $3}' >"$dir/forward_policy.before"
    dockerd --bridge=none --data-root "$dir/data" --exec-root "$dir/exec" \
        --pidfile "$dir/dockerd.pid" --host "unix://$dir/docker.sock" \
        >"$dir/dockerd.log" 2>&1 &
    for _ in $(seq 120); do
        if DOCKER_HOST="unix://$dir/docker.sock" docker version >/dev/null 2>&1; then
            echo "export DOCKER_HOST=unix://$dir/docker.sock"
            return
        fi
        if ! kill -0 $! 2>/dev/null; then break; fi
        sleep 0.5
    done
    echo "dockerd did not start; its log: $dir/dockerd.log" >&2
    tail -5 "$dir/dockerd.log" >&2 || true
    stop
    exit 1
}

# the chains dockerd made (DOCKER, DOCKER-USER, DOCKER-ISOLATION-STAGE-*), in both tables
remove_chains() {
    local table rule chain rules chains
    for table in nat filter; do
        rules=$(iptables -t "$table" -S 2>/dev/null) || continue
        # jumps into the DOCKER* chains from the built-in ones first, then the chains
        while read -r rule; do
            # shellcheck disable=SC2086
            iptables -t "$table" ${rule/-A/-D} || true
        done < <(grep -E '^-A (PREROUTING|OUTPUT|POSTROUTING|FORWARD|INPUT) .*-j DOCKER' <<<"$rules" || true)
        chains=$(awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}' <<<"$rules")
        for chain in $chains; do iptables -t "$table" -F "$chain" || true; done
        for chain in $chains; do iptables -t "$table" -X "$chain" || true; done
    done
}

stop() {
    if [ -f "$dir/dockerd.pid" ]; then
        local pid; pid=$(cat "$dir/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    remove_chains
    if [ -f "$dir/ip_forward.before" ]; then
        cat "$dir/ip_forward.before" >/proc/sys/net/ipv4/ip_forward || true
    fi
    if [ -s "$dir/forward_policy.before" ]; then
        iptables -P FORWARD "$(cat "$dir/forward_policy.before")" || true
    fi
    # containerd's shims are gone with the daemon; the overlay mounts may linger
    local mount
    for mount in $(grep -o " $dir/[^ ]*" /proc/mounts | sort -r || true); do
        umount "$mount" 2>/dev/null || umount -l "$mount" || true
    done
    rm -rf "$dir/data" "$dir/exec" "$dir/data.img"
}

"$cmd"
