#!/usr/bin/env bash
# The main job, end to end and offline, on built-in data: generate a folder of photo-like images,
# index it with the shipped `tiny` model, index it again (nothing to do), search it, describe it.
set -euo pipefail
cd "$(dirname "$0")/.."
ce() { .venv/bin/clipengine "$@"; }
photos=data/demo-photos

.venv/bin/python -m clipengine.synthetic "$photos" 200
echo; echo "== index (first run embeds every image)"
ce index "$photos" --index demo --model tiny
echo; echo "== index again (incremental: nothing changed, nothing decoded)"
ce index "$photos" --index demo
echo; echo "== image -> image: the query photo itself comes first"
ce search --image "$photos/img_000042.jpg" --index demo -k 5
echo; echo "== text -> image (tiny has random weights until trained: the ranking is not meaningful yet)"
ce search "a red circle on a blue background" --index demo -k 3
echo; echo "== what the index holds"
ce info --index demo
