#!/usr/bin/env bash
# The main job, end to end and offline, on built-in data (a few minutes on 2 CPU cores):
# generate captioned scenes -> train a small CLIP model on them -> index the images with it ->
# search by text and by image from the terminal -> benchmark recall@k on 1000 unseen scenes, against
# the untrained model.
set -euo pipefail
cd "$(dirname "$0")/.."
ce() { .venv/bin/clipengine "$@"; }
scenes=data/demo-scenes
run=runs/demo

echo "== generate 6000 captioned scenes (shapes with colours, sizes, counts and places)"
ce scenes "$scenes" --count 6000
echo; echo "== train the shipped 'tiny' model from scratch (held-out recall is printed after each epoch)"
rm -rf "$run"
ce train --data "$scenes/captions.csv" --out "$run" --model tiny --epochs 12 --batch-size 128 --lr 1e-3
echo; echo "== index the scenes with the trained checkpoint"
ce index "$scenes/images" --index demo-scenes --checkpoint "$run" --rebuild
caption_of() { grep -m1 "$(basename "$1")" "$scenes/captions.csv" | cut -d, -f2-; }
for query in "two large red circles on the left" "a small blue square at the top" "three yellow crosses"; do
  echo; echo "== text -> image: \"$query\" (each hit shown with its own caption)"
  ce search "$query" --index demo-scenes -k 5 --paths-only | while read -r path; do
    echo "  $(basename "$path")  $(caption_of "$path")"
  done
done
echo; echo "== image -> image: scenes like scene_000042 ($(caption_of scene_000042.jpg))"
ce search --image "$scenes/images/scene_000042.jpg" --index demo-scenes -k 5 --paths-only | while read -r path; do
  echo "  $(basename "$path")  $(caption_of "$path")"
done
echo; echo "== what the index holds"
ce info --index demo-scenes
echo; echo "== benchmark: recall@k on 1000 scenes never seen in training (another seed), trained vs untrained"
ce scenes data/demo-test-scenes --count 1000 --seed 1
ce bench retrieval --data data/demo-test-scenes/captions.csv --model tiny --json runs/bench-untrained.json > /dev/null
ce bench retrieval --data data/demo-test-scenes/captions.csv --checkpoint "$run" --json runs/bench-trained.json
ce bench compare runs/bench-untrained.json runs/bench-trained.json
echo; echo "== look at it in a browser: .venv/bin/clipengine serve --index demo-scenes --open"
