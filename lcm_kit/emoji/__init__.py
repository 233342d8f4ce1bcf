"""The built-in default data set, embedded: captioned Noto Color Emoji images and the metric made for them.

* :mod:`lcm_kit.emoji.dataset` -- the dataset builder (``python -m lcm_kit.emoji --out data/emoji32 --size 32``)
  and the one split reader, :func:`read_split` (with :func:`held_out`, the evaluation set: test captions + images).
* :mod:`lcm_kit.emoji.features` -- :class:`EmojiFeatureNet` (committed in ``models/emoji-features``) and
  :func:`feature_fid_kid`, FID-emoji / KID-emoji.

Nothing generic in ``lcm_kit`` imports this package; the emoji defaults are supplied by the callers
(``examples/distill_emoji.py``, ``bench/quality.py``, ``examples/teacher/``).
"""

from .dataset import (
    EMOJI_TEST_PATH,
    FONT_PATH,
    STRIKE_PPEM,
    EmojiExample,
    EmojiRecord,
    build_emoji_dataset,
    held_out,
    list_emoji,
    main,
    parse_emoji_test,
    read_split,
    render_emoji,
    split_captions,
)
from .features import DEFAULT_FEATURES_DIR, EmojiFeatureNet, feature_fid_kid, load_feature_net, save_feature_net

__all__ = [
    "DEFAULT_FEATURES_DIR",
    "EMOJI_TEST_PATH",
    "FONT_PATH",
    "STRIKE_PPEM",
    "EmojiExample",
    "EmojiFeatureNet",
    "EmojiRecord",
    "build_emoji_dataset",
    "feature_fid_kid",
    "held_out",
    "list_emoji",
    "load_feature_net",
    "main",
    "parse_emoji_test",
    "read_split",
    "render_emoji",
    "save_feature_net",
    "split_captions",
]
