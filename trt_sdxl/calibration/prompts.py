"""The built-in calibration prompts: 72 prompts written for this project, spread over subjects
(people, animals, landscapes, cities, interiors, objects, food, vehicles, fantasy, abstract),
styles (photo, painting, illustration, 3D render, pixel art, line art) and lighting, so that
activation ranges seen during calibration cover what users ask for.

`load_prompts(path)` reads a user's file instead: one prompt per line, `#` comments ignored. A
model folder may carry prompts of its own domain as `calibration_prompts.txt` (the embedded tiny
default does: it draws only Fashion-MNIST's ten kinds of clothing); `model_prompts(model)` finds it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

MIN_PROMPTS = 8

CALIBRATION_PROMPTS = (
    "a portrait photo of an elderly fisherman with a weathered face, golden hour, 85mm lens",
    "a red fox curled up asleep in fresh snow, soft morning light, wildlife photography",
    "a misty pine forest at dawn with sun rays between the trees",
    "a neon-lit street in a rainy city at night, reflections on wet asphalt, cinematic",
    "a cozy reading nook with a window seat, stacked books and a steaming mug of tea",
    "a bowl of ramen with a soft-boiled egg, scallions and chashu, overhead food photo",
    "a vintage red sports car parked on a coastal road, late afternoon sun",
    "a dragon perched on a ruined castle tower, storm clouds, epic fantasy painting",
    "an abstract composition of overlapping translucent circles in pastel colours",
    "a watercolor painting of a quiet harbor with small fishing boats",
    "pixel art of a tiny island with a lighthouse and palm trees, 16-bit style",
    "a 3d render of a glossy ceramic teapot on a marble table, studio lighting",
    "an astronaut floating above the earth, highly detailed, photorealistic",
    "a bustling open-air market in marrakech with colourful spices and lanterns",
    "a minimalist line drawing of a cat stretching",
    "a snow-capped mountain range reflected in a still alpine lake",
    "a close-up macro photo of a dew-covered spider web",
    "a steampunk airship flying over victorian london, detailed illustration",
    "a child flying a kite on a windy beach, film photography, grainy",
    "an oil painting of sunflowers in a blue vase, thick impasto brushstrokes",
    "a futuristic city skyline with flying vehicles at sunset, concept art",
    "a herd of elephants crossing a dusty savanna, dramatic sky",
    "a japanese zen garden with raked gravel and a maple tree in autumn",
    "a plate of colourful macarons arranged in a spiral, pastel background",
    "a wooden cabin in the woods covered in snow, warm light in the windows",
    "a jazz musician playing saxophone on a smoky stage, moody lighting",
    "a coral reef teeming with tropical fish, underwater photography",
    "a medieval knight in ornate armour standing in a field of poppies",
    "an isometric illustration of a small bakery with people inside",
    "a black and white street photo of commuters on a subway platform",
    "a hummingbird hovering next to a bright red flower, fast shutter speed",
    "a surreal landscape with melting clocks and floating islands",
    "a cup of cappuccino with latte art on a rustic wooden table",
    "a lighthouse on a rocky cliff during a violent storm, crashing waves",
    "a fantasy elf archer in a glowing enchanted forest, digital painting",
    "a modern living room with large windows, scandinavian interior design",
    "a golden retriever puppy playing with a ball in the grass",
    "the northern lights over a frozen lake, long exposure",
    "a bowl of fresh fruit, still life in the style of the dutch masters",
    "a cyberpunk hacker in a dark room lit by multiple monitors",
    "a hot air balloon festival over green hills at sunrise",
    "a detailed pencil sketch of an old oak tree",
    "a spaceship interior with glowing control panels, science fiction",
    "a traditional chinese ink painting of misty mountains and a lone boat",
    "a bride and groom walking through a field of lavender, wedding photo",
    "a robot watering plants in a greenhouse, soft cinematic light",
    "a stack of pancakes with maple syrup and blueberries, food photography",
    "a desert with towering sand dunes under a starry night sky",
    "a comic book panel of a superhero landing on a rooftop",
    "a gothic cathedral interior with stained glass windows and light beams",
    "an owl with piercing yellow eyes perched on a branch at dusk",
    "a low-poly 3d model of a mountain village",
    "a busy tokyo crossing seen from above, long exposure light trails",
    "a ballerina mid-leap on an empty stage, spotlight, dramatic shadows",
    "a field of tulips in the netherlands with a windmill in the background",
    "an ancient greek temple on a hill at sunset, ruins",
    "a bowl of steaming tomato soup with basil, rustic kitchen",
    "a tiger walking through tall grass, intense gaze, national geographic style",
    "a tranquil river winding through a green valley, aerial photo",
    "a whimsical mushroom house in a fairy tale forest, children's book illustration",
    "a sleek electric motorcycle on a white background, product photo",
    "a portrait of a young woman with freckles, natural light, shallow depth of field",
    "a volcano erupting at night with rivers of glowing lava",
    "a chessboard mid-game with dramatic side lighting, macro",
    "a snowy owl flying over a winter landscape",
    "an art deco poster of a luxury ocean liner",
    "a rainy window with blurred city lights behind it, bokeh",
    "a group of friends laughing around a campfire at night",
    "a geometric pattern of hexagons in gold and black",
    "a koi pond with lily pads and a small wooden bridge",
    "a portrait of a samurai in traditional armour, ukiyo-e woodblock print",
    "an empty highway stretching into the horizon under a pink sky",
)


MODEL_PROMPTS = "calibration_prompts.txt"


def model_prompts(model) -> Path | None:
    """The model folder's own calibration prompt file, if it has one."""
    path = Path(model) / MODEL_PROMPTS
    return path if path.is_file() else None


def load_prompts(path: str | Path | None) -> list[str]:
    """The built-in prompts (path None) or the prompts in a user's text file."""
    if path is None:
        prompts = list(CALIBRATION_PROMPTS)
    else:
        p = Path(path)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--calibration-prompts {p}: cannot read it as UTF-8 text ({e.__class__.__name__})")
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if len(prompts) < MIN_PROMPTS:
            raise UserError(f"--calibration-prompts {p}: {len(prompts)} prompts; calibration needs at least "
                            f"{MIN_PROMPTS} (one per line)")
    return prompts
