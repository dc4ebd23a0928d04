#!/usr/bin/env bash
# Proves, without a Docker daemon, that the Docker image's build stage has every file the
# build reads: the paths the Dockerfile COPYs from the build context (COPY lines without
# --from) are copied, placed as the Dockerfile places them, into an empty folder, and the
# binary is built there with `cargo build --locked`. A file the build needs that the
# Dockerfile does not copy (as assets/docs.html once was) fails this step.
#
# The debug profile with the repository's target dir as CARGO_TARGET_DIR, not the image's
# release build: the dependencies are reused from the test build, while keymeter itself is
# compiled from the copied files (they are fresh copies, newer than anything built, so
# cargo's fingerprint sends it to rustc). The compiler reads the same files in both profiles.
# Supported Dockerfile syntax: WORKDIR, and COPY with files, directories or globs relative
# to the context, destinations relative to (or under) the WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log() { printf '==> %s\n' "$*" >&2; }
die() { log "check-image-inputs: $*"; exit 1; }

workdir=/
copied=()
# Instructions with their backslash-continued lines joined, comments dropped.
while read -r instr rest; do
    case "${instr^^}" in
    WORKDIR)
        case "$rest" in /*) workdir=$rest ;; *) workdir="${workdir%/}/$rest" ;; esac ;;
    COPY)
        read -r -a args <<<"$rest"
        [[ " ${args[*]} " == *" --from="* ]] && continue
        parts=()
        for a in "${args[@]}"; do [[ $a == --* ]] || parts+=("$a"); done
        ((${#parts[@]} >= 2)) || die "cannot read: COPY $rest"
        dest=${parts[-1]}
        srcs=("${parts[@]:0:${#parts[@]}-1}")
        # The destination, relative to the stage's WORKDIR (where cargo runs).
        case "$dest" in
        /*) [[ $dest == "${workdir%/}"/* || $dest == "${workdir%/}" ]] ||
                die "COPY to $dest, outside WORKDIR $workdir: not supported here"
            rel=${dest#"${workdir%/}"}; rel=${rel#/} ;;
        *) rel=${dest#./} ;;
        esac
        [[ $rel == . ]] && rel=
        as_dir=false
        { ((${#srcs[@]} > 1)) || [[ $dest == */ || -z $rel ]]; } && as_dir=true
        for pattern in "${srcs[@]}"; do
            shopt -s nullglob
            matches=($pattern)
            shopt -u nullglob
            ((${#matches[@]})) || die "COPY names $pattern, which is not in the repository"
            for m in "${matches[@]}"; do
                if [[ -d $m ]]; then
                    # Docker copies a directory's contents, not the directory itself.
                    mkdir -p "$work/$rel"
                    cp -R "$m/." "$work/$rel/"
                elif $as_dir || ((${#matches[@]} > 1)); then
                    mkdir -p "$work/$rel"
                    cp "$m" "$work/$rel/"
                else
                    mkdir -p "$(dirname "$work/$rel")"
                    cp "$m" "$work/$rel"
                fi
                copied+=("$m")
            done
        done ;;
    esac
done < <(sed -e ':a' -e '/\\$/{N;s/\\\n/ /;ba}' Dockerfile | grep -v '^[[:space:]]*#')

((${#copied[@]})) || die "the Dockerfile copies nothing from the context"
log "the Dockerfile's build inputs: ${copied[*]}"
log "building keymeter from those alone (cargo build --locked, target dir $repo/target)"
cd "$work"
CARGO_TARGET_DIR="$repo/target" cargo build --locked --bin keymeter
log "the Dockerfile's COPY lines are enough to build keymeter"
