"""``python -m lcm_kit.emoji --out data/emoji64 --size 64``: render the emoji dataset (:func:`lcm_kit.emoji.main`)."""

from .dataset import main

main()
