#!/usr/bin/env bash
# Builds the Kubernetes v1.20.2 parts the tests run from Debian bookworm's `kubernetes` source package
# (kube-apiserver and kube-controller-manager for the API tests; kubelet, kube-scheduler and kube-proxy
# for the real node of the e2e), and installs etcd-server, as ../shared/design/kube-apiserver.md and
# kubelet-node.md describe. Idempotent: the binaries are
# cached by version under $BULKHEAD_CACHE (default ~/.cache/bulkhead); the build tree is removed once
# they are in place, and nothing is built when they are present. Prints the directory holding them on its last line.
set -euo pipefail
# Run from a cargo build or test, OUT_DIR names cargo's folder; the Kubernetes
# Makefile reads it as where its own output goes, and the binaries land there.
unset OUT_DIR

VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=${BULKHEAD_CACHE:-$HOME/.cache/bulkhead}
# -r2: the kubelet that leaves kernel tunables alone; a cache from before it is rebuilt.
OUT=$CACHE/kubernetes-v$VERSION-r2
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet)

# One build at a time: tests that start control planes side by side wait here for the first to finish.
mkdir -p "$CACHE"
exec 9>"$CACHE/.kubernetes-build.lock"
flock 9

need_pkgs=()
for p in golang-1.19-go etcd-server rsync make golang-github-modern-go-reflect2-dev openssl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    echo "kubernetes-build: installing ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
command -v kubectl >/dev/null || { echo "kubernetes-build: kubectl is not installed" >&2; exit 1; }

built=1
for c in "${COMPONENTS[@]}"; do [[ -x $OUT/$c ]] || built=0; done
# node-images.sh builds the pod sandbox image from this source's pause.c, kept beside the binaries.
[[ -f $OUT/pause.c ]] || built=0
if ((built)); then
    echo "$OUT"
    exit 0
fi

W=$CACHE/kube-build
mkdir -p "$W/apt/parts" "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/home"
# A deb-src entry derived from this machine's own apt sources, so no mirror host is hard-coded.
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$W/apt/parts/src.sources"
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$W/apt/parts"
     -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache")
if [[ ! -f $W/kubernetes_1.20.5+really1.20.2.orig.tar.gz ]]; then
    apt-get "${APT[@]}" update -qq >&2
    (cd "$W" && apt-get "${APT[@]}" source --download-only "kubernetes=$DEB_VERSION" >&2)
fi
if [[ ! -d $W/kubernetes-$VERSION ]]; then
    tar xzf "$W/kubernetes_1.20.5+really1.20.2.orig.tar.gz" -C "$W"
fi
cd "$W/kubernetes-$VERSION"
# The vendored reflect2 v1.0.1 crashes under Go >= 1.18; Debian's 1.0.2 works.
rm -rf vendor/github.com/modern-go/reflect2
cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
# The stock kubelet sets vm.overcommit_memory, kernel.panic and kernel.panic_on_oops on the machine it
# starts on, which here is shared with everything else: this build's container manager only warns.
# (Edited in this unpacked copy of the source; Go's -overlay through the Makefile's GOFLAGS did not take.)
cm=pkg/kubelet/cm/container_manager_linux.go
sed -i 's/b := KernelTunableModify/b := KernelTunableWarn/' "$cm"
grep -q 'b := KernelTunableWarn' "$cm" || { echo "kubernetes-build: $cm changed; update the edit" >&2; exit 1; }
WHAT=()
for c in "${COMPONENTS[@]}"; do WHAT+=("cmd/$c"); done
echo "kubernetes-build: building ${COMPONENTS[*]} v$VERSION (about 10 minutes on 2 cores)" >&2
PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 GOPROXY=off HOME=$W/home \
    KUBE_GIT_VERSION=v$VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
    make WHAT="${WHAT[*]}" GOLDFLAGS="-s -w" >&2
mkdir -p "$OUT.tmp"
for c in "${COMPONENTS[@]}"; do cp "_output/bin/$c" "$OUT.tmp/"; done
cp build/pause/linux/pause.c "$OUT.tmp/"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
# The unpacked tree, its output and Go's build cache take several GB the cached binaries no longer
# need; on a machine with little disk left they pushed the test node into DiskPressure.
cd / && rm -rf "$W"
echo "$OUT"
