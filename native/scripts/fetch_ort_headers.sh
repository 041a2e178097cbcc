#!/usr/bin/env bash
# Fetches ONNX Runtime's C API headers at build time (they are never committed).
#
#   native/scripts/fetch_ort_headers.sh DEST_DIR
#
# Leaves DEST_DIR/onnxruntime/onnxruntime_c_api.h (and the other headers of the
# package) and prints that include directory. The onnxruntime wheel ships the
# library but no headers, and Debian bookworm has no onnxruntime package; Debian
# trixie's libonnxruntime-dev (1.21) does. ORT's C API is ABI-stable, so these
# headers drive the wheel's newer library (the runtime asks for the header's
# ORT_API_VERSION, which every later library serves).
#
# Route: the pinned .deb from the Debian archive, checked against its SHA-256;
# if the archive has moved on (a point release replaced the file), apt-get with a
# private trixie source list downloads the current one (apt checks the archive's
# signature and the file's hash). Only the headers are extracted (dpkg-deb -x into
# a scratch folder; nothing is installed).
#
# Environment: DIJIANG_ORT_INCLUDE_DIR (a folder already holding
# onnxruntime_c_api.h: used as it is, nothing fetched).
set -euo pipefail

DEST="${1:?usage: fetch_ort_headers.sh DEST_DIR}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

if [[ -n "${DIJIANG_ORT_INCLUDE_DIR:-}" ]]; then
    if [[ -f "$DIJIANG_ORT_INCLUDE_DIR/onnxruntime_c_api.h" ]]; then
        echo "$DIJIANG_ORT_INCLUDE_DIR"
        exit 0
    fi
    echo "fetch_ort_headers.sh: DIJIANG_ORT_INCLUDE_DIR=$DIJIANG_ORT_INCLUDE_DIR has no onnxruntime_c_api.h" >&2
    exit 2
fi
if [[ -f "$DEST/onnxruntime/onnxruntime_c_api.h" ]]; then
    echo "$DEST/onnxruntime"
    exit 0
fi

MIRROR="http://deb.debian.org/debian"
DEB_PATH="pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
DEB_SHA256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
WORK="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

fetch_pinned() {
    local out="$WORK/pinned.deb"
    if command -v curl >/dev/null; then
        curl -fsSL --retry 2 -o "$out" "$MIRROR/$DEB_PATH" || return 1
    elif command -v wget >/dev/null; then
        wget -q -O "$out" "$MIRROR/$DEB_PATH" || return 1
    else
        return 1
    fi
    echo "$DEB_SHA256  $out" | sha256sum -c --quiet - >/dev/null 2>&1 || {
        echo "fetch_ort_headers.sh: $DEB_PATH does not have the pinned SHA-256; ignoring it" >&2
        return 1
    }
    echo "$out"
}

fetch_with_apt() {
    command -v apt-get >/dev/null || return 1
    local apt="$WORK/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/dl"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
                -o "APT::Architecture=amd64" -o "APT::Architectures=amd64" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" -qq update >&2 || return 1
    (cd "$apt/dl" && apt-get "${opts[@]}" -qq download libonnxruntime-dev >&2) || return 1
    ls "$apt/dl"/libonnxruntime-dev_*.deb
}

DEB="$(fetch_pinned || true)"
if [[ -z "$DEB" ]]; then
    echo "fetch_ort_headers.sh: pinned download failed; asking apt for trixie's libonnxruntime-dev" >&2
    DEB="$(fetch_with_apt || true)"
fi
if [[ -z "$DEB" || ! -f "$DEB" ]]; then
    echo "fetch_ort_headers.sh: could not download libonnxruntime-dev from $MIRROR (trixie);" \
         "set DIJIANG_ORT_INCLUDE_DIR to a folder with onnxruntime_c_api.h" >&2
    exit 1
fi
dpkg-deb -x "$DEB" "$WORK/x"
SRC="$WORK/x/usr/include/onnxruntime"
[[ -f "$SRC/onnxruntime_c_api.h" ]] || { echo "fetch_ort_headers.sh: $DEB holds no onnxruntime_c_api.h" >&2; exit 1; }
rm -rf "$DEST/onnxruntime"
mv "$SRC" "$DEST/onnxruntime"
cp "$WORK/x/usr/share/doc/libonnxruntime-dev/copyright" "$DEST/onnxruntime/COPYRIGHT.debian" 2>/dev/null || true
echo "$DEST/onnxruntime"
