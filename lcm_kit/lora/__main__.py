"""``python -m lcm_kit.lora to-kohya IN.safetensors OUT.safetensors [--alpha A]``."""

from .files import main

raise SystemExit(main())
