#!/usr/bin/env bash
# Builds kube-apiserver v1.20.2 from Debian bookworm's `kubernetes` source package and installs
# etcd-server, as ../shared/design/kube-apiserver.md describes. Idempotent: the binaries are cached by
# version under $BULKHEAD_CACHE (default ~/.cache/bulkhead) and nothing is done when they are present.
# Prints the directory holding kube-apiserver on its last line.
set -euo pipefail

VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=${BULKHEAD_CACHE:-$HOME/.cache/bulkhead}
OUT=$CACHE/kube-apiserver-v$VERSION

need_pkgs=()
for p in golang-1.19-go etcd-server rsync make golang-github-modern-go-reflect2-dev openssl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    echo "kube-apiserver-build: installing ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
command -v kubectl >/dev/null || { echo "kube-apiserver-build: kubectl is not installed" >&2; exit 1; }

if [[ -x $OUT/kube-apiserver ]]; then
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
echo "kube-apiserver-build: building kube-apiserver v$VERSION (about 5 minutes on 2 cores)" >&2
PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 GOPROXY=off HOME=$W/home \
    KUBE_GIT_VERSION=v$VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
    make WHAT="cmd/kube-apiserver" GOLDFLAGS="-s -w" >&2
mkdir -p "$OUT.tmp"
cp _output/bin/kube-apiserver "$OUT.tmp/"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$OUT"
