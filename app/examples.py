"""Example inputs for every tab, written in the embedded model's world vocabulary (shapes, colours,
positions, backgrounds; see training/world.py), so they work out of the box with the default model.
tests/test_embedded.py checks that the images show what their captions say."""
from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"

PROMPTS = [
    ["a large red circle on the left on a white background"],
    ["a small blue square in the top right corner on a black background"],
    ["a yellow star in the centre on a plain green background"],
    ["a purple triangle at the bottom on a textured white background"],
    ["a plain white background"],
]
PAIRS = [
    ["a large red circle on the left on a white background", "a large blue square on the right on a white background"],
    ["a small green triangle on the left, black background", "a small green triangle on the right, black background"],
]
# Renders of held-out scenes of the world (seeds 1090001, 1090003, 1090022) with their own captions.
IMAGES = [
    [str(EXAMPLES_DIR / "blue_triangle_centre.png"), "a large blue triangle in the centre, yellow background"],
    [str(EXAMPLES_DIR / "yellow_circle_bottom_left.png"), "a large yellow circle in the bottom left, white background"],
    [str(EXAMPLES_DIR / "green_square_left.png"), "a small green square on the left side on a black background"],
]
INSTRUCTIONS = [
    [str(EXAMPLES_DIR / "blue_triangle_centre.png"), "make the triangle red"],
    [str(EXAMPLES_DIR / "yellow_circle_bottom_left.png"), "make the background black"],
    [str(EXAMPLES_DIR / "green_square_left.png"), "turn the square into a circle"],
]
# Text edits of the example images: [image, source prompt (its caption), target prompt]. Each target keeps the
# caption's word count (one word swapped), so Prompt-to-Prompt's "replace" mode works on all of them.
EDITS = [
    [str(EXAMPLES_DIR / "blue_triangle_centre.png"), "a large blue triangle in the centre, yellow background",
     "a large red triangle in the centre, yellow background"],                      # recolour
    [str(EXAMPLES_DIR / "yellow_circle_bottom_left.png"), "a large yellow circle in the bottom left, white background",
     "a large yellow square in the bottom left, white background"],                 # reshape
    [str(EXAMPLES_DIR / "green_square_left.png"), "a small green square on the left side on a black background",
     "a small green square on the left side on a white background"],                # background
]
# Real-image interpolation: [image A, image B, prompt A, prompt B].
IMAGE_PAIRS = [
    [IMAGES[0][0], IMAGES[1][0], IMAGES[0][1], IMAGES[1][1]],
    [IMAGES[1][0], IMAGES[2][0], IMAGES[1][1], IMAGES[2][1]],
]
# DiffEdit: [image, target prompt, source prompt (the caption)]; the mask comes from the prompts' difference.
DIFFEDITS = [
    [str(EXAMPLES_DIR / "blue_triangle_centre.png"), "a large red triangle in the centre, yellow background",
     "a large blue triangle in the centre, yellow background"],
    [str(EXAMPLES_DIR / "yellow_circle_bottom_left.png"), "a large green circle in the bottom left, white background",
     "a large yellow circle in the bottom left, white background"],
]
# SDEdit: [stroke painting (512 px, rough hand-drawn-like polygons), prompt, strength t0].
SDEDITS = [
    [str(EXAMPLES_DIR / "strokes_red_blob_left.png"), "a large red circle on the left on a white background", 0.6],
    [str(EXAMPLES_DIR / "strokes_yellow_patch_top_right.png"),
     "a large yellow square in the top right on a blue background", 0.6],
]
