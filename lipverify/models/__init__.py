"""Model zoo (architectures from the literature) and the embedded default model."""
