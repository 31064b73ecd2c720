#!/usr/bin/env bash
# Records the `.BTF` sections of Debian kernel packages into debian-6.1-6.12.btf.xz (see the
# README beside this script). Needs apt (Debian), dpkg-deb, xz, zstd, gzip and objcopy.
# Usage: record.sh PACKAGE... (each a linux-image-*-unsigned package apt can download)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
chown _apt "$work" 2>/dev/null || true

# Finds the compressed kernel inside a bzImage as the kernel's scripts/extract-vmlinux does:
# try each compression magic at each place it occurs until one decompresses to an ELF file.
extract_vmlinux() {
    local image=$1 out=$2 magic tool pos
    for pair in 'fd377a585a00:xz -dc' '28b52ffd:zstd -dcq' '1f8b0800:gzip -dc'; do
        magic=${pair%%:*}
        tool=${pair#*:}
        for pos in $(LC_ALL=C grep -obUaP "$(sed 's/../\\x&/g' <<<"$magic")" "$image" | cut -d: -f1); do
            tail -c "+$((pos + 1))" "$image" | $tool >"$out" 2>/dev/null || true
            if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                return 0
            fi
        done
    done
    echo "no compressed kernel found in $image" >&2
    return 1
}

: >all.btf
for package in "$@"; do
    apt-get download -q "$package"
    deb=$(ls "${package}"_*.deb)
    mkdir -p "root-$package"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "root-$package" --wildcards './boot/vmlinuz-*'
    extract_vmlinux "root-$package"/boot/vmlinuz-* vmlinux
    objcopy -O binary --only-section=.BTF vmlinux btf
    echo "$package $(dpkg-deb -f "$deb" Version): $(stat -c %s btf) bytes, sha256 $(sha256sum btf | cut -d' ' -f1)"
    cat btf >>all.btf
    rm -f vmlinux btf "$deb"
done
xz -T1 --lzma2=preset=9e,dict=16MiB -c all.btf >"$here/debian-6.1-6.12.btf.xz"
