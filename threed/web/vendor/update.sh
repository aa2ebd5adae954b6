#!/bin/sh
# Rebuild three.min.js (and LICENSE-three.txt) from the npm registry: three.js core, GLTFLoader and
# OrbitControls as one minified classic script (window.THREE), so report.html works from file:// too.
# To update: change THREE_VERSION (and ESBUILD_VERSION if needed), run `sh threed/web/vendor/update.sh`,
# open a report, run tests/test_report.py, commit the new three.min.js with the versions in the message.
set -eu
THREE_VERSION=0.187.0
ESBUILD_VERSION=0.28.2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "three@$THREE_VERSION" >/dev/null
npm install --silent --no-save --no-audit --no-fund "esbuild@$ESBUILD_VERSION" "./three-$THREE_VERSION.tgz"
cp "$here/three-entry.js" entry.js
npx --no-install esbuild entry.js --bundle --minify --format=iife --target=es2020 --legal-comments=none \
  --banner:js="/* three.js $THREE_VERSION (https://threejs.org, MIT licence, see LICENSE-three.txt): core, GLTFLoader, OrbitControls; built by update.sh with esbuild $ESBUILD_VERSION */" \
  --outfile="$here/three.min.js" --log-level=warning
cp node_modules/three/LICENSE "$here/LICENSE-three.txt"
ls -l "$here/three.min.js"
