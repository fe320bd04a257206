#!/usr/bin/env bash
# Builds the plugins written in other languages into examples/out/:
#   python-policy.wasm  (examples/python-policy, componentize-py)  a balancer
#   python-filter.wasm  (examples/python-filter, componentize-py)  a filter
#   js-policy.wasm      (examples/js-policy, componentize-js)      a balancer
#
# The tools are installed on first use in a local folder (no system-wide
# install): componentize-py in a Python venv, componentize-js with npm.
# A build takes 5-10 s and its .wasm is 12-18 MB, so each result is cached by
# the content of what makes it (the sources, wit/, the tool's version), and a
# source that did not change is not built again.
#
#   examples/build.sh                 # needs python3 (with venv) and node 20 + npm
#   FULCRUM_TOOLS=dir FULCRUM_EXAMPLES_CACHE=dir examples/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/tool-versions
cache_home=${XDG_CACHE_HOME:-$HOME/.cache}/fulcrum
TOOLS=${FULCRUM_TOOLS:-$cache_home/tools}
CACHE=${FULCRUM_EXAMPLES_CACHE:-$cache_home/examples}
OUT=examples/out
mkdir -p "$TOOLS" "$CACHE" "$OUT"

python_tool() {
  local venv="$TOOLS/componentize-py-$COMPONENTIZE_PY"
  if [[ ! -x "$venv/bin/componentize-py" ]]; then
    echo "installing componentize-py $COMPONENTIZE_PY in $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY"
  fi
  echo "$venv/bin/componentize-py"
}

js_tool() {
  local dir="$TOOLS/componentize-js-$COMPONENTIZE_JS"
  if [[ ! -d "$dir/node_modules/@bytecodealliance/componentize-js" ]]; then
    echo "installing componentize-js $COMPONENTIZE_JS in $dir" >&2
    mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund "@bytecodealliance/componentize-js@$COMPONENTIZE_JS" >/dev/null)
  fi
  echo "$dir"
}

# The cache key of an example: its files, the WIT and the tool's version.
key_of() {
  local dir=$1 tool=$2
  { find "$dir" wit -type f -name '*.*' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; echo "$tool"; } \
    | sha256sum | cut -c1-32
}

# build NAME DIR WORLD TOOL-LABEL COMMAND...: runs COMMAND (which writes $target) unless cached.
build() {
  local name=$1 dir=$2 world=$3 label=$4; shift 4
  local key; key=$(key_of "$dir" "$label $world")
  local cached="$CACHE/$name-$key.wasm"
  if [[ -s "$cached" ]]; then
    echo "$name: cached ($cached)"
  else
    echo "$name: building with $label"
    local work; work=$(mktemp -d)
    cp -r "$dir"/. "$work"/
    target="$work/out.wasm"
    "$@" "$work"
    mv "$target" "$cached.partial" && mv "$cached.partial" "$cached"
    rm -rf "$work"
  fi
  cp "$cached" "$OUT/$name.wasm.partial" && mv "$OUT/$name.wasm.partial" "$OUT/$name.wasm"
}

py_build() {
  local work=$1
  local wit=$PWD/wit
  (cd "$work" && "$PY" -d "$wit" -w "$WORLD" componentize app -o "$target" >/dev/null)
}

js_build() {
  local work=$1
  # Beside node_modules: an ES module resolves packages from where it lies.
  cp "$work/componentize.mjs" "$JS/componentize.mjs"
  node "$JS/componentize.mjs" "$work/policy.js" "$PWD/wit" "$WORLD" "$target"
}

PY=""
JS=""
needs_py() { [[ -n $PY ]] || PY=$(python_tool); }
needs_js() { [[ -n $JS ]] || JS=$(js_tool); }

for example in python-policy:balancer python-filter:filter; do
  name=${example%%:*}; WORLD=${example##*:}
  key=$(key_of "examples/$name" "componentize-py $COMPONENTIZE_PY $WORLD")
  [[ -s "$CACHE/$name-$key.wasm" ]] || needs_py
  build "$name" "examples/$name" "$WORLD" "componentize-py $COMPONENTIZE_PY" py_build
done
WORLD=balancer
key=$(key_of examples/js-policy "componentize-js $COMPONENTIZE_JS $WORLD")
[[ -s "$CACHE/js-policy-$key.wasm" ]] || needs_js
build js-policy examples/js-policy "$WORLD" "componentize-js $COMPONENTIZE_JS" js_build
ls -l "$OUT"/*.wasm
