#!/usr/bin/env bash
# Builds tfscale's Horovod environment in ./.venv-horovod, idempotently:
#   - tensorflow-cpu 2.18.1 (the newest TensorFlow that Horovod 0.28.1 builds against; it builds against 2.14–2.18
#     and fails against 2.19+, see docs/horovod.md), with the newest Keras 3 that pip resolves beside it;
#   - Horovod 0.28.1 compiled from source with Gloo (no MPI, no PyTorch, no MXNet): 2–5 minutes on 2 cores the first
#     time. The built wheel is cached under ${TFSCALE_CACHE_DIR:-~/.cache/tfscale}/horovod-wheels/, keyed by the
#     Horovod, TensorFlow and Python versions, so a rerun (or a CI run on the same machine) reuses it;
#   - tfscale itself, installed editable, with its test extras.
# A second call does nothing that is already done. Set TFSCALE_PYTHON to choose the interpreter,
# TFSCALE_HOROVOD_TF to choose another TensorFlow in 2.14–2.18 (e.g. 2.17.1).
# Use:  bash tools/setup_horovod_env.sh && .venv-horovod/bin/horovodrun -np 4 -H localhost:4 --gloo \
#           .venv-horovod/bin/python scripts/train.py --backend=horovod
set -euo pipefail
cd "$(dirname "$0")/.."

HVD_VERSION=0.28.1
TF_VERSION="${TFSCALE_HOROVOD_TF:-2.18.1}"
case "$TF_VERSION" in
  2.14.*|2.15.*|2.16.*|2.17.*|2.18.*) ;;
  *) echo "tfscale: TFSCALE_HOROVOD_TF=$TF_VERSION: Horovod $HVD_VERSION builds only against TensorFlow 2.14–2.18" >&2
     exit 2 ;;
esac
PY="${TFSCALE_PYTHON:-python3}"
VENV=.venv-horovod

if [ ! -x "$VENV/bin/python" ]; then
  echo "tfscale: creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.tfscale-installed-hvd${HVD_VERSION}-tf${TF_VERSION}"

if [ -f "$stamp" ] && [ ! setup.py -nt "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] \
    && [ ! "$0" -nt "$stamp" ]; then
  exit 0
fi

# 1. TensorFlow first: Horovod compiles against the TensorFlow installed in the environment.
if ! "$VPY" -c "import tensorflow as tf, sys; sys.exit(tf.__version__ != '$TF_VERSION')" >/dev/null 2>&1; then
  echo "tfscale: installing tensorflow-cpu==$TF_VERSION into $VENV (a few minutes the first time)" >&2
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "tensorflow-cpu==$TF_VERSION" "keras>=3.5" setuptools wheel packaging
fi

# 2. Horovod, from the cached wheel if one was built for these versions, otherwise compiled from source.
pyver=$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cache="${TFSCALE_CACHE_DIR:-$HOME/.cache/tfscale}/horovod-wheels/hvd${HVD_VERSION}-tf${TF_VERSION}-py${pyver}-gloo"
if ! "$VPY" -c "import horovod.tensorflow as hvd, sys; sys.exit(not hvd.gloo_built())" >/dev/null 2>&1; then
  if ! ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
    command -v cmake >/dev/null || { echo "tfscale: building Horovod needs cmake (apt-get install -y cmake)" >&2; exit 1; }
    command -v g++ >/dev/null || { echo "tfscale: building Horovod needs g++ (apt-get install -y g++)" >&2; exit 1; }
    echo "tfscale: building Horovod $HVD_VERSION with Gloo against TensorFlow $TF_VERSION (2–5 minutes on 2 cores)" >&2
    mkdir -p "$cache.tmp"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="-j${TFSCALE_BUILD_JOBS:-2}" \
      "$VPY" -m pip wheel -q --no-deps --no-build-isolation --no-binary horovod -w "$cache.tmp" \
        "horovod==$HVD_VERSION"
    rm -rf "$cache"
    mv "$cache.tmp" "$cache"
  else
    echo "tfscale: reusing the cached Horovod wheel in $cache" >&2
  fi
  "$VPY" -m pip install -q "$cache"/horovod-*.whl
fi

# 3. tfscale, editable, without its `tensorflow` requirement (tensorflow-cpu provides the same module and pip would
#    otherwise add the newest `tensorflow` beside it), then the rest of its requirements and test extras.
"$VPY" -m pip install -q --no-deps -e .
deps=$("$VPY" - <<'PYEOF'
import ast, re
text = open("pyproject.toml").read()
def toml_list(name):  # the list `name = [...]` (pyproject's lists here hold only strings; tomllib needs 3.11)
    return ast.literal_eval(re.search(r"^" + name + r" = (\[.*?\])", text, re.S | re.M).group(1))
reqs = toml_list("dependencies") + toml_list("test")
print(" ".join(r for r in reqs if not r.replace(" ", "").startswith(("tensorflow>", "tensorflow=", "tensorflow<"))))
PYEOF
)
# shellcheck disable=SC2086
"$VPY" -m pip install -q $deps "tensorflow-cpu==$TF_VERSION"
"$VPY" -c "import horovod.tensorflow as hvd, tensorflow as tf, keras; assert hvd.gloo_built(); \
print('tfscale: .venv-horovod ready: tensorflow', tf.__version__, 'keras', keras.__version__, 'horovod', \
__import__('horovod').__version__)" >&2
touch "$stamp"
