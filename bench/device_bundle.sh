#!/bin/bash
# Packs the Python packages an offline GPU box lacks into two xz tarballs of unpacked site-packages
# (each under the 64 MiB a device call may carry), for Python 3.12 x86-64:
#   .carry/p/site.tar.xz   oxenai and polars (the two large native libraries; polars stripped)
#   .carry/q/site.tar.xz   everything else: prefect and its server, diffusers, transformers, peft,
#                          pydantic, bitsandbytes (CUDA 13 library only), dask + prefect-dask
# On the box: for t in .carry/?/site.tar.xz; do tar -C /tmp/site -xJf $t; done; export PYTHONPATH=/tmp/site
# A machine with network access needs none of this: pip install -e .[gpu,distributed].
# Usage: bash bench/device_bundle.sh DEVICE_PACKAGE_LIST   (one lowercase name per line: what the box has)
set -euo pipefail
have=$1
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
pins=$(cd "$root" && .venv/bin/python - <<'PY'
import importlib.metadata as md
names = ["prefect", "oxenai", "bitsandbytes", "diffusers", "transformers", "peft", "pydantic",
         "prefect-dask", "dask", "distributed"]
print(" ".join(f"{n}=={md.version(n)}" for n in names))
PY
)
"$root/.venv/bin/pip" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 -d "$work/wheels" $pins 2>/dev/null
mkdir -p "$work/p" "$work/q"
for wheel in "$work"/wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  case $name in nvidia-*|torch|triton|ruff|maturin|pytest*) continue ;; esac
  case $name in transformers|regex|pydantic*|typing-inspection|annotated-types) ;;  # newer than the box's
    *) grep -qx "$name" "$have" && continue ;; esac
  case $name in oxenai|polars|polars-runtime-*) dest=p ;; *) dest=q ;; esac
  unzip -qo "$wheel" -d "$work/$dest"
done
find "$work/q/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
strip --strip-unneeded "$work"/p/_polars_runtime_*/*.so
find "$work" -name __pycache__ -prune -exec rm -rf {} +
for part in p q; do
  mkdir -p "$root/.carry/$part"
  tar -C "$work/$part" -cf - . | xz -6 -T0 > "$root/.carry/$part/site.tar.xz.tmp"
  mv "$root/.carry/$part/site.tar.xz.tmp" "$root/.carry/$part/site.tar.xz"
done
rm -rf "$work"
ls -la "$root"/.carry/?/site.tar.xz
