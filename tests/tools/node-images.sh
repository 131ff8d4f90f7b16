#!/usr/bin/env bash
# What a real node needs beside the Kubernetes binaries (../shared/design/kubelet-node.md): containerd,
# runc and the CNI plugins from Debian, and two test images built FROM scratch with umoci — the pod
# sandbox `pause` (Kubernetes' own pause.c, static) and `busybox` (Debian's busybox-static; its nc and
# httpd are the test workloads). Idempotent, cached under $BULKHEAD_CACHE; prints the folder holding
# pause.oci.tar and busybox.oci.tar on its last line. The pause.c comes from kubernetes-build.sh's cache.
set -euo pipefail
CACHE=${BULKHEAD_CACHE:-$HOME/.cache/bulkhead}
OUT=$CACHE/node-images-v1

mkdir -p "$CACHE"
exec 9>"$CACHE/.node-images.lock"
flock 9

need_pkgs=()
for p in containerd runc containernetworking-plugins busybox-static umoci gcc libc6-dev conntrack; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    echo "node-images: installing ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
    # Debian starts the packaged containerd where systemd runs; the tests run their own.
    systemctl disable --now containerd >/dev/null 2>&1 || true
fi

if [[ -f $OUT/pause.oci.tar && -f $OUT/busybox.oci.tar ]]; then
    echo "$OUT"
    exit 0
fi
# kubernetes-build.sh keeps pause.c beside its binaries (built once, cached; it prints their folder last).
PAUSE_C=$(bash "$(dirname "$0")/kubernetes-build.sh" | tail -n 1)/pause.c

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
# image NAME: an empty image whose rootfs the caller fills in $W/NAME/bundle/rootfs, then `finish NAME ENTRYPOINT`.
start() {
    umoci init --layout "$W/$1/layout"
    umoci new --image "$W/$1/layout:latest"
    umoci unpack --image "$W/$1/layout:latest" "$W/$1/bundle" >/dev/null
}
finish() {
    local name=$1 entrypoint=$2
    umoci repack --image "$W/$name/layout:latest" "$W/$name/bundle"
    umoci config --image "$W/$name/layout:latest" --os linux --architecture amd64 \
        --config.entrypoint="$entrypoint" --config.cmd=
    umoci gc --layout "$W/$name/layout"
    tar -C "$W/$name/layout" -cf "$W/$name.oci.tar" .
}

start pause
gcc -static -O2 -DVERSION=v1.20.2 -o "$W/pause/bundle/rootfs/pause" "$PAUSE_C"
finish pause /pause

start busybox
root=$W/busybox/bundle/rootfs
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
finish busybox /bin/sh

mkdir -p "$OUT.tmp"
mv "$W/pause.oci.tar" "$W/busybox.oci.tar" "$OUT.tmp/"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$OUT"
