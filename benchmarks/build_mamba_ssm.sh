#!/bin/bash
# Builds mamba-ssm and causal-conv1d from their PyPI source releases for sm_90 (H100/H200) only, for the
# side-by-side benchmarks on a GPU machine that has nvcc but no network. Run from the repo root there:
#   bash benchmarks/build_mamba_ssm.sh [--no-conv]
# A package already installed is skipped, so where one command's time limit is shorter than both builds
# (165 s and 354 s on an H200 once; more than 600 s together another time), run it with --no-conv first,
# then again without: each run installs what it built. Each build prints its time as it ends.
# Beforehand, where there is network, fetch the sdists (about 250 KB) into an ignored folder and carry it:
#   echo /.sdist/ >> .git/info/exclude
#   MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
#     python -m pip download --no-deps --no-build-isolation -d .sdist mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
# Both setup.py files hard-code a list of -gencode pairs (sm_75 ... sm_121 with CUDA 13, 9 targets), which is
# what makes the stock build take 8 minutes and more: the sed below keeps only sm_90, and
# TORCH_CUDA_ARCH_LIST=9.0 stops torch's cpp_extension from adding others.
set -e
SD=${SDIST_DIR:-.sdist}
ARCH=${ARCH:-90}
W=/tmp/whl; B=/tmp/build; mkdir -p $W $B
export TORCH_CUDA_ARCH_LIST="${ARCH:0:1}.${ARCH:1}" MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=1

only_arch() {  # keep the -gencode pair of $ARCH, drop the others
  sed -E -i '/cc_flag\.append\("-gencode"\)/d; s/cc_flag\.append\("arch=compute_([0-9]+),code=sm_[0-9]+"\)/cc_flag += ["-gencode", "arch=compute_\1,code=sm_\1"] if "\1" == "'"$ARCH"'" else []/' "$1"
  grep -q '"'"$ARCH"'" == "'"$ARCH"'"' "$1" || { echo "$1: no sm_$ARCH entry after patching (setup.py changed?)"; exit 1; }
}

build() {  # $1 sdist glob, $2 the package's FORCE_BUILD variable
  tar xzf $SD/$1 -C $B
  local dir=$(ls -d $B/${1%%-*}-*/ | head -1)
  only_arch "$dir/setup.py"
  local t=$(date +%s)
  ( cd "$dir" && env "$2=TRUE" python3 -m pip wheel -q --no-deps --no-build-isolation -w $W . )
  echo "  built $1 in $(( $(date +%s) - t )) s"
  python3 -m pip install -q --no-deps --no-index $W/*.whl  # now: a later build that runs out of time keeps this one
}

if python3 -c "import mamba_ssm" 2>/dev/null; then
  echo "mamba_ssm already installed"
else
  build "mamba_ssm-*.tar.gz" MAMBA_FORCE_BUILD
fi
if [ "$1" != "--no-conv" ] && ! python3 -c "import causal_conv1d" 2>/dev/null; then
  build "causal_conv1d-*.tar.gz" CAUSAL_CONV1D_FORCE_BUILD
fi
python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)"
python3 -c "import causal_conv1d; print('causal_conv1d', causal_conv1d.__version__)" || true
