#!/usr/bin/env bash
# Build the ctv2v images, tagged with the package version from pyproject.toml and with the git commit.
#
#   scripts/build-images.sh [--push] [--lock FILE] [--allow-dirty] [--dry-run] [IMAGE...]
#
# IMAGE is one of: trainer cpu mlflow-server (default: all three). trainer and cpu are the two kinds of
# images/ctv2v/Dockerfile (--build-arg IMAGE_KIND=...); mlflow-server has its own Dockerfile. Each image gets two
# tags, ${REGISTRY:+$REGISTRY/}ctv2v/IMAGE:VERSION and ...:git-COMMIT (the commit's first 12 hex digits), e.g.
# REGISTRY=registry.example.com/ml gives registry.example.com/ml/ctv2v/trainer:0.1.0 and
# registry.example.com/ml/ctv2v/trainer:git-0123456789ab.
#
# --push pushes both tags of each image and then writes the lock file (--lock, default build/images.lock.json):
# the commit, the version and, per image, the commit tag and the pushed digest (`REPO@sha256:...`), which
# `ctv2v pipeline compile --images-lock FILE` pins the steps to, so the compiled YAML and the images cannot
# drift. Pushing needs a clean work tree (a digest recorded for a commit must be built from that commit);
# --allow-dirty builds from uncommitted changes anyway, tagging them git-COMMIT-dirty.
# --dry-run prints the docker commands instead of running them and writes nothing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
all_images=(trainer cpu mlflow-server)

usage() {
    echo "usage: $0 [--push] [--lock FILE] [--allow-dirty] [--dry-run] [IMAGE...]   (IMAGE: ${all_images[*]})" >&2
    exit 2
}

is_image() {
    local name
    for name in "${all_images[@]}"; do
        if [ "$name" = "$1" ]; then
            return 0
        fi
    done
    return 1
}

push=false
dry_run=false
allow_dirty=false
lock_file="$root/build/images.lock.json"
images=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --push) push=true ;;
        --dry-run) dry_run=true ;;
        --allow-dirty) allow_dirty=true ;;
        --lock)
            if [ "$#" -lt 2 ]; then
                echo "$0: --lock needs a file name" >&2
                usage
            fi
            lock_file="$2"
            shift
            ;;
        -h|--help) usage ;;
        -*) echo "$0: unknown option: $1" >&2; usage ;;
        *)
            if ! is_image "$1"; then
                echo "$0: no such image: $1 (known: ${all_images[*]})" >&2
                exit 2
            fi
            images+=("$1")
            ;;
    esac
    shift
done
if [ "${#images[@]}" -eq 0 ]; then
    images=("${all_images[@]}")
fi

# The [project] table's `version = "X.Y.Z"`: the one source of the version tag.
version="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$root/pyproject.toml")"
if [ -z "$version" ] || [ "$(printf '%s\n' "$version" | wc -l)" -ne 1 ]; then
    echo "$0: cannot read one 'version = \"...\"' line from $root/pyproject.toml" >&2
    exit 1
fi

prefix="${REGISTRY:+${REGISTRY%/}/}ctv2v"

# Recorded in the images (and by MLflow with every run); a tree with uncommitted changes is marked -dirty.
commit="$(git -C "$root" rev-parse HEAD)"
if [ -n "$(git -C "$root" status --porcelain)" ]; then
    if "$push" && ! "$allow_dirty"; then
        echo "$0: the work tree has uncommitted changes: commit them, or pass --allow-dirty to push anyway" >&2
        exit 1
    fi
    commit="$commit-dirty"
fi
commit_tag="git-${commit:0:12}${commit:40}"

run() {
    if "$dry_run"; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# The digest the registry gave the pushed image: the RepoDigests entry of this repository.
pushed_digest() {
    local repository="$1" tag="$2" reference
    reference="$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$tag" \
        | grep -m 1 "^${repository}@sha256:[0-9a-f]\{64\}$" || true)"
    if [ -z "$reference" ]; then
        echo "$0: docker reports no digest of $repository for $tag after the push" >&2
        exit 1
    fi
    printf '%s\n' "${reference#*@}"
}

lock_entries=()
for image in "${images[@]}"; do
    repository="$prefix/$image"
    case "$image" in
        trainer|cpu) build=(--file "$root/images/ctv2v/Dockerfile" --build-arg "IMAGE_KIND=$image") ;;
        *) build=(--file "$root/images/$image/Dockerfile") ;;
    esac
    run docker build "${build[@]}" --build-arg "CTV2V_GIT_COMMIT=$commit" \
        --tag "$repository:$version" --tag "$repository:$commit_tag" "$root"
    if "$push"; then
        run docker push "$repository:$version"
        run docker push "$repository:$commit_tag"
        if ! "$dry_run"; then
            digest="$(pushed_digest "$repository" "$repository:$commit_tag")"
            lock_entries+=("$(printf '    "%s": {"tag": "%s", "ref": "%s@%s"}' \
                "$image" "$repository:$commit_tag" "$repository" "$digest")")
        fi
    fi
done

if "$push" && ! "$dry_run"; then
    mkdir -p "$(dirname "$lock_file")"
    {
        printf '{\n  "commit": "%s",\n  "version": "%s",\n  "images": {\n' "$commit" "$version"
        last=$((${#lock_entries[@]} - 1))
        for n in "${!lock_entries[@]}"; do
            if [ "$n" -lt "$last" ]; then
                printf '%s,\n' "${lock_entries[$n]}"
            else
                printf '%s\n' "${lock_entries[$n]}"
            fi
        done
        printf '  }\n}\n'
    } > "$lock_file.tmp"
    mv "$lock_file.tmp" "$lock_file"
    echo "wrote $lock_file" >&2
fi
