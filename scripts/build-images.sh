#!/usr/bin/env bash
# Build the ctv2v images, tagged with the package version from pyproject.toml.
#
#   scripts/build-images.sh [--push] [--dry-run] [IMAGE...]
#
# IMAGE is one of: trainer cpu mlflow-server (default: all three). Tags are
# ${REGISTRY:+$REGISTRY/}ctv2v/IMAGE:VERSION, e.g. REGISTRY=registry.example.com/ml gives
# registry.example.com/ml/ctv2v/trainer:0.1.0. --push pushes each image after it is built; --dry-run prints
# the docker commands instead of running them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
all_images=(trainer cpu mlflow-server)

usage() {
    echo "usage: $0 [--push] [--dry-run] [IMAGE...]   (IMAGE: ${all_images[*]})" >&2
    exit 2
}

push=false
dry_run=false
images=()
for arg in "$@"; do
    case "$arg" in
        --push) push=true ;;
        --dry-run) dry_run=true ;;
        -h|--help) usage ;;
        -*) echo "$0: unknown option: $arg" >&2; usage ;;
        *)
            if [ ! -f "$root/images/$arg/Dockerfile" ]; then
                echo "$0: no such image: $arg (known: ${all_images[*]})" >&2
                exit 2
            fi
            images+=("$arg")
            ;;
    esac
done
if [ "${#images[@]}" -eq 0 ]; then
    images=("${all_images[@]}")
fi

# The [project] table's `version = "X.Y.Z"`: the one source of the image tag.
version="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$root/pyproject.toml")"
if [ -z "$version" ] || [ "$(printf '%s\n' "$version" | wc -l)" -ne 1 ]; then
    echo "$0: cannot read one 'version = \"...\"' line from $root/pyproject.toml" >&2
    exit 1
fi

prefix="${REGISTRY:+${REGISTRY%/}/}ctv2v"

# Recorded in the images (and by MLflow with every run); a tree with uncommitted changes is marked -dirty.
commit="$(git -C "$root" rev-parse HEAD)"
if [ -n "$(git -C "$root" status --porcelain)" ]; then
    commit="$commit-dirty"
fi

run() {
    if "$dry_run"; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

for image in "${images[@]}"; do
    tag="$prefix/$image:$version"
    run docker build --file "$root/images/$image/Dockerfile" --build-arg "CTV2V_GIT_COMMIT=$commit" \
        --tag "$tag" "$root"
    if "$push"; then
        run docker push "$tag"
    fi
done
