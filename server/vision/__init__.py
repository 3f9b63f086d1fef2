"""The vision pipeline: decoding, detection, alignment, quality, and one small class per model."""
