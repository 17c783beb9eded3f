#!/usr/bin/env bash
# Make the offline stimulus images available (Fashion-MNIST, IDX files).
# Order: already present -> Debian package (when apt-get exists and we may use it) -> explain.
set -u
dir=/usr/share/datasets/fashion-mnist
if ls "$dir"/*.gz >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "Installing the offline stimulus images (Debian package dataset-fashion-mnist)..."
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
    && exit 0
fi
echo "note: Fashion-MNIST not found under $dir and could not be installed with apt-get." >&2
echo "      mindvis will try torchvision's download (needs internet) or MINDVIS_FASHION_MNIST=DIR;" >&2
echo "      the scikit-image photos are used for backgrounds either way." >&2
exit 0
