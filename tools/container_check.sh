#!/usr/bin/env bash
# Build the Dockerfile with podman from a locally built Debian base and run qsmprep inside it
# under Apptainer's conditions: an arbitrary non-root uid, a read-only root, no network, the
# input bound read-only and the output bound writable.
#
#   make container-check                     # or: bash tools/container_check.sh
#
# For machines without a Docker engine or access to image registries (run as root; about
# 3-5 minutes and 3 GB of disk the first time). Steps:
#   1. podman, buildah, debootstrap, runc (apt-get) when missing;
#   2. a Debian bookworm rootfs with python3 (debootstrap minbase), cached as a tarball;
#   3. imported as localhost/qsmprep-base:local (the Dockerfile's BASE_IMAGE);
#   4. the image, with the CPU torch wheel of the local wheel folder (pip's find-links), the
#      CA bundle and that folder mounted at build time only;
#   5. inside it, as uid 12345 with --read-only --network none: `qsmprep --version`, the
#      TemplateFlow home (`qsmprep-templates check`), `qsmprep demo` into a bound output folder,
#      and the BIDS App on the demo's dataset bound read-only; the outputs are checked on the
#      host;
#   6. the image size.
# Environment: QSMPREP_CHECK_CACHE (base tarball; ~/.cache/qsmprep-container),
# QSMPREP_CHECK_OUT (outputs; out/container-check), QSMPREP_CHECK_IMAGE (localhost/qsmprep:check),
# WHEELS (a wheel folder; default pip's find-links).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${QSMPREP_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qsmprep-container}
OUT=$(realpath -m "${QSMPREP_CHECK_OUT:-out/container-check}")
IMAGE=${QSMPREP_CHECK_IMAGE:-localhost/qsmprep:check}
BASE=localhost/qsmprep-base:local
SUITE=bookworm
CA=/etc/ssl/certs/ca-certificates.crt
# crun fails on rlimits and hybrid cgroups here; runc with cgroupfs works; overlay is fast
PODMAN=(podman --storage-driver overlay --runtime runc --cgroup-manager cgroupfs)
RUN_OPTS=(--rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
fail() { echo "container-check: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (rootful podman, debootstrap)"

step "1. tools"
need=()
for tool in podman buildah debootstrap runc; do
  command -v "$tool" > /dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} and their helpers"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah debootstrap \
    fuse-overlayfs uidmap slirp4netns runc > /dev/null
fi
podman --version

step "2. base rootfs ($SUITE, cached in $CACHE)"
mkdir -p "$CACHE"
TARBALL=$CACHE/$SUITE-minbase-python3.tar
if [ ! -s "$TARBALL" ]; then
  MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2> /dev/null | head -1)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXX")
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar -C "$ROOTFS" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$ROOTFS"
fi
ls -lh "$TARBALL"

step "3. import $BASE"
if ! "${PODMAN[@]}" image exists "$BASE"; then
  "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$BASE" < "$TARBALL" > /dev/null
fi
"${PODMAN[@]}" image ls "$BASE"

step "4. build $IMAGE"
WHEELS=${WHEELS:-$(pip config list 2> /dev/null | sed -n "s/.*find-links='\([^' ]*\).*/\1/p" | head -1)}
build_mounts=(-v "$CA:$CA:ro")
build_args=(--build-arg BASE_IMAGE="$BASE" --build-arg TORCH_VARIANT=cpu)
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  echo "local wheels: $WHEELS (mounted for the build only)"
  build_mounts+=(-v "$WHEELS:$WHEELS:ro")
  # the CPU torch wheel comes from the folder; everything else from PyPI
  build_args+=(--build-arg WHEELS_DIR="$WHEELS" --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' qsmprep/__about__.py)
REVISION=$(git rev-parse HEAD 2> /dev/null || echo unknown)
t0=$(date +%s)
echo "log: $CACHE/build.log"
"${PODMAN[@]}" build --isolation chroot "${build_mounts[@]}" "${build_args[@]}" \
  --build-arg VERSION="$VERSION" --build-arg VCS_REF="$REVISION" \
  --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -t "$IMAGE" -f Dockerfile . > "$CACHE/build.log" 2>&1 \
  || { tail -30 "$CACHE/build.log"; fail "podman build"; }
grep -E 'STEP [0-9]+/[0-9]+: (FROM|RUN|COPY)|COMMIT|^Successfully (installed|tagged)' \
  "$CACHE/build.log" | cut -c1-150
echo "build: $(($(date +%s) - t0)) s"

run() {  # Apptainer's conditions: any uid, read-only root, no network, tmpfs /tmp
  "${PODMAN[@]}" run "${RUN_OPTS[@]}" --user 12345:12345 --read-only --network none \
    --tmpfs /tmp:rw,mode=1777 "$@"
}

step "5a. qsmprep --version"
run "$IMAGE" --version | tee "$CACHE/version.txt"
grep -q "qsmprep $VERSION" "$CACHE/version.txt" || fail "--version does not print $VERSION"

step "5a'. TemplateFlow home baked in (read offline)"
run --entrypoint /bin/sh "$IMAGE" -c 'python -c "import templateflow.api as t; \
print(len(t.templates()), \"templates in\", t.TF_LAYOUT.root)"; \
if command -v qsmprep-templates > /dev/null; then qsmprep-templates check; fi' \
  || fail "TemplateFlow home"

step "5b. qsmprep demo (uid 12345, read-only root, no network)"
rm -rf "$OUT"
mkdir -p "$OUT"
chmod 0777 "$OUT"
t0=$(date +%s)
run -v "$OUT:/out:rw" "$IMAGE" demo /out/demo --nprocs 2 > "$CACHE/demo.log" 2>&1 \
  || { tail -40 "$CACHE/demo.log"; fail "qsmprep demo"; }
grep -E 'simulating|NRMSE|reports:|demo finished' "$CACHE/demo.log" || true
echo "demo: $(($(date +%s) - t0)) s"

step "5c. BIDS App on the demo dataset bound read-only: shipped networks, baked template"
mkdir -p "$OUT/app"
chmod 0777 "$OUT/app"
run -v "$OUT/demo/bids:/data:ro" -v "$OUT/app:/out:rw" "$IMAGE" \
  /data /out/qsmprep participant --participant-label 01 --methods tkd dsbn adaptive \
  --output-spaces MNI152NLin2009cAsym:res-1 -w /out/work \
  > "$CACHE/app.log" 2>&1 || { tail -40 "$CACHE/app.log"; fail "qsmprep participant"; }

step "5d. outputs on the host"
deriv=$OUT/demo/derivatives/qsmprep
expected=(
  "$deriv/dataset_description.json"
  "$deriv/qsmprep_settings.json"
  "$deriv/sub-01.html"
  "$deriv/group.html"
  "$deriv/group_metrics.tsv"
  "$deriv/sub-01/anat/sub-01_desc-brain_mask.nii.gz"
  "$deriv/sub-01/anat/sub-01_desc-local_fieldmap.nii.gz"
  "$OUT/app/qsmprep/sub-01/anat/sub-01_desc-tkd_Chimap.nii.gz"
  "$OUT/app/qsmprep/sub-01/anat/sub-01_desc-dsbn_Chimap.nii.gz"
  "$OUT/app/qsmprep/sub-01/anat/sub-01_desc-adaptive_Chimap.nii.gz"
  "$OUT/app/qsmprep/sub-01/anat/sub-01_space-MNI152NLin2009cAsym_res-1_desc-dsbn_Chimap.nii.gz"
  "$OUT/app/qsmprep/sub-01/anat/sub-01_desc-dsbn_roistats.tsv"
  "$OUT/app/qsmprep/sub-01.html"
)
for method in tkd l2 tv medi; do
  expected+=("$deriv/sub-01/anat/sub-01_desc-${method}_Chimap.nii.gz")
done
for f in "${expected[@]}"; do
  [ -s "$f" ] || fail "missing output $f"
  echo "ok ${f#"$OUT"/}"
done
owner=$(stat -c %u "$deriv/sub-01.html")
[ "$owner" = 12345 ] || fail "outputs owned by uid $owner, not 12345"

step "6. image"
"${PODMAN[@]}" image inspect "$IMAGE" --format \
  'labels: version={{index .Labels "org.opencontainers.image.version"}} revision={{index .Labels "org.opencontainers.image.revision"}} created={{index .Labels "org.opencontainers.image.created"}}'
size=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')
base_size=$("${PODMAN[@]}" image inspect "$BASE" --format '{{.Size}}')
echo "image size: $size bytes ($((size / 1000000)) MB): base $((base_size / 1000000)) MB +" \
  "qsmprep layers $(((size - base_size) / 1000000)) MB"
echo "container-check: PASSED"
