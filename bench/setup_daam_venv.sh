#!/usr/bin/env bash
# Create the separate environment for bench/daam_baseline.py: the original DAAM (PyPI daam 0.2.0,
# castorini/daam) with the old diffusers it pins, kept apart from opendaam's own environment.
#
# Usage: bash bench/setup_daam_venv.sh        (DAAM_VENV=/other/dir to install elsewhere)
#
# Idempotent: an environment that already holds the pinned versions and imports daam is left as is;
# otherwise the missing parts are installed into it. Exits non-zero with a message on any failure.
#
# Steps: torch==2.13.0 first, from the CPU wheel on local disk (an unpinned torch from the registry
# is a multi-GB CUDA build), then everything else under a constraints file that holds torch==2.13.0
# so nothing can upgrade it. Pins beyond torch, and why:
#   daam==0.2.0                the baseline itself; it pins diffusers==0.21.2, transformers==4.30.2,
#   diffusers==0.21.2            accelerate==0.23.0 exactly (repeated here to make them explicit);
#   transformers==4.30.2         transformers 4.30.2 caps tokenizers <0.14: tokenizers 0.13.3, whose
#   accelerate==0.23.0          wheels stop at CPython 3.11 (no 3.12 wheel of any tokenizers <0.14,
#   tokenizers==0.13.3            so this environment needs Python 3.11)
#   huggingface_hub==0.25.2    diffusers 0.21.2 imports huggingface_hub.cached_download, removed in
#                                0.26; neither diffusers nor transformers bounds it tightly enough
#   gradio==5.14.0             daam requires gradio unpinned (only its demo uses it); 5.14.0 is what
#                                pip settles on under huggingface_hub<0.26 after downloading ~30 newer
#                                releases, so pinning it skips that backtracking
#   matplotlib==3.11.2         daam imports matplotlib at import time but does not declare it
#   numpy==2.4.6               the version this was tested with (numpy 2 works with these releases)
set -euo pipefail

VENV="${DAAM_VENV:-/opt/daam-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
TORCH_PIN="torch==2.13.0"
PINS=(
    "daam==0.2.0"
    "diffusers==0.21.2"
    "transformers==4.30.2"
    "tokenizers==0.13.3"
    "accelerate==0.23.0"
    "huggingface_hub==0.25.2"
    "gradio==5.14.0"
    "matplotlib==3.11.2"
    "numpy==2.4.6"
)

die() {
    echo "setup_daam_venv: ERROR: $*" >&2
    exit 1
}

# Exit 0 when the environment imports daam and holds every pinned version (torch as the CPU build).
check_env() {
    "$VENV/bin/python" - "$TORCH_PIN" "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != wanted:
        bad.append(f"{name}: want {wanted}, have {have}")
if bad:
    sys.exit("; ".join(bad))
import torch  # noqa: E402

if torch.version.cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA build")
import daam  # noqa: E402,F401
import diffusers  # noqa: E402,F401
EOF
}

if [ -x "$VENV/bin/python" ] && check_env >/dev/null 2>&1; then
    echo "setup_daam_venv: $VENV is already set up (daam 0.2.0, diffusers 0.21.2, $TORCH_PIN CPU)"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH (set PYTHON=/path/to/python3.11)"
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$pyver" = "3.11" ] || die "$PYTHON is Python $pyver; Python 3.11 is needed (the local torch CPU wheel is" \
    "cp311 and tokenizers 0.13.3, required by transformers 4.30.2, has no wheel for newer Pythons)"

if ! ls "$TORCH_WHEEL_DIR"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    die "no CPU wheel torch-2.13.0+cpu-*.whl in $TORCH_WHEEL_DIR (set TORCH_WHEEL_DIR); refusing to" \
        "install torch from the registry, which would pull a multi-GB CUDA build"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_daam_venv: creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create the virtual environment $VENV"
fi
PIP=("$VENV/bin/python" -m pip)

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_PIN" >"$constraints"

echo "setup_daam_venv: installing $TORCH_PIN (CPU wheel from $TORCH_WHEEL_DIR)"
"${PIP[@]}" install --find-links "$TORCH_WHEEL_DIR" "$TORCH_PIN" \
    || die "could not install $TORCH_PIN from $TORCH_WHEEL_DIR"
"$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' \
    || die "the installed torch is a CUDA build; remove $VENV and check $TORCH_WHEEL_DIR"

echo "setup_daam_venv: installing ${PINS[*]} (constraint: $TORCH_PIN)"
"${PIP[@]}" install --find-links "$TORCH_WHEEL_DIR" -c "$constraints" "${PINS[@]}" \
    || die "could not install ${PINS[*]} under the constraint $TORCH_PIN"

problems="$(check_env 2>&1)" || die "the environment does not check out: $problems"
echo "setup_daam_venv: done: $VENV (run bench/daam_baseline.py with $VENV/bin/python)"
