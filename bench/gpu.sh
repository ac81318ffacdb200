#!/usr/bin/env bash
# The device check on a machine without network: installs what its Python lacks from bench/wheels/
# (made by bench/gpu_wheels.sh, carried with the working tree) into a temporary folder, puts that
# folder and the repository on PYTHONPATH (the project itself is not installed: it needs dagster),
# then runs bench/gpu_check.py with this script's arguments.
#
#     bash bench/gpu.sh                                   # a GPU machine: 256 pages per format, ~7 min
#     bash bench/gpu.sh --device cpu --pages 4            # here
#
# PYTHON names the interpreter (default: python, else python3).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
wheels=$here/wheels
limit_mib=64
py=${PYTHON:-python}
command -v "$py" >/dev/null || py=python3

if compgen -G "$wheels/*.whl" >/dev/null; then
    total=$(du -cb "$wheels"/*.whl | tail -1 | cut -f1)
    echo "bench/wheels: $(ls "$wheels"/*.whl | wc -l) wheels, $(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB"
    if (( total > limit_mib * 1048576 )); then
        echo "bench/wheels holds more than $limit_mib MiB: it cannot travel with the working tree;" \
             "remake it with bench/gpu_wheels.sh" >&2
        exit 2
    fi
else
    echo "no bench/wheels: run bench/gpu_wheels.sh where there is network and carry bench/wheels here;" \
         "going on with this Python's own packages"
fi

site=$(mktemp -d -t gpu-check-site-XXXXXX)
trap 'rm -rf "$site"' EXIT
# install a wheel's distribution where this Python lacks it or holds an older version; pip where
# there is one, else the wheel unzipped (a wheel is a zip of its installed files)
"$py" - "$wheels" "$site" <<'EOF' || exit 2
import importlib.metadata, importlib.util, platform, re, subprocess, sys, zipfile
from pathlib import Path

wheels, site = Path(sys.argv[1]), Path(sys.argv[2])


def release(version):
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def compatible(tags):
    python, abi, plat = tags.split("-")
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    ok_python = any(p in ("py3", here) or (abi == "abi3" and p.startswith("cp3") and int(p[3:]) <= int(here[3:]))
                    for p in python.split("."))
    ok_plat = plat == "any" or ("linux" in plat and plat.endswith(platform.machine()))
    return ok_python and ok_plat and (abi in ("none", "abi3", here))


wanted = {}
for wheel in sorted(wheels.glob("*.whl")):
    parts = wheel.name[:-4].split("-")  # name-version[-build]-python-abi-platform
    key = re.sub(r"[-_.]+", "-", parts[0]).lower()
    wanted.setdefault(key, (parts[1], []))[1].append((wheel, "-".join(parts[-3:])))
install = []
for key, (version, files) in sorted(wanted.items()):
    try:
        have = importlib.metadata.version(key)
    except importlib.metadata.PackageNotFoundError:
        have = None
    action = "install" if have is None or release(have) < release(version) else "keep"
    print(f"  {key:<20} wheel {version:<10} here {have or '-':<12} {action}")
    if action == "install":
        install.append((key, version, files))
if not install:
    sys.exit(0)
pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links",
       str(wheels), "--target", str(site)]
if importlib.util.find_spec("pip"):
    if subprocess.run([*pip, *(f"{k}=={v}" for k, v, _ in install)]).returncode == 0:
        sys.exit(0)
    # one at a time: a wheel that fits no Python here leaves the others installed, and the check
    # says what then fails
    for key, version, _ in install:
        if subprocess.run([*pip, "--upgrade", f"{key}=={version}"]).returncode:
            print(f"  {key} {version}: not installed (see pip's message above)")
    sys.exit(0)
for key, version, files in install:
    fitting = [wheel for wheel, tags in files if compatible(tags)]
    if not fitting:
        print(f"  {key} {version}: no wheel here fits Python {sys.version.split()[0]}")
        continue
    with zipfile.ZipFile(fitting[0]) as archive:
        archive.extractall(site)
EOF

export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root" && "$py" bench/gpu_check.py "$@"
