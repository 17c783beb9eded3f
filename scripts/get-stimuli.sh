#!/usr/bin/env bash
# Make the offline stimulus images available: Fashion-MNIST (IDX files) and Animal-MNIST (two gzip files).
# Fashion-MNIST: already present -> Debian package (when apt-get exists and we may use it) -> explain.
# Animal-MNIST: its two data files are taken from the package's wheel into mindvis's cache
# (${MINDVIS_DATA:-~/.cache/mindvis}/animal-mnist); installing the package would pull TensorFlow.
set -u
animal="${MINDVIS_DATA:-$HOME/.cache/mindvis}/animal-mnist"
if [ ! -f "$animal/animal_label_version_3.gz" ] || [ ! -f "$animal/animal_data_version_3.gz" ]; then
  tmp=$(mktemp -d)
  if python3 -m pip download --quiet --no-deps --only-binary=:all: animal-mnist==0.4 -d "$tmp" >/dev/null 2>&1; then
    python3 - "$tmp" "$animal" <<'PY' || echo "note: Animal-MNIST could not be unpacked; --source fashion+animal is unavailable" >&2
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
names = ("animal_data_version_3.gz", "animal_label_version_3.gz")
with zipfile.ZipFile(next(src.glob("*.whl"))) as whl:
    for member in whl.namelist():
        name = member.rsplit("/", 1)[-1]
        if name in names:
            part = dst / (name + ".partial")
            part.write_bytes(whl.read(member))
            part.replace(dst / name)
missing = [n for n in names if not (dst / n).is_file()]
sys.exit(f"missing in the wheel: {missing}" if missing else 0)
PY
  else
    echo "note: Animal-MNIST could not be downloaded; --source fashion+animal is unavailable" >&2
  fi
  rm -rf "$tmp"
fi
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
