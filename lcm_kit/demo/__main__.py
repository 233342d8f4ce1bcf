"""``python -m lcm_kit.demo [--model FOLDER] [--lora FILE] [--port 7860]``: the live sketch-to-image page."""

from .cli import main

if __name__ == "__main__":
    main()
