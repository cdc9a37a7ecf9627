"""Stage 1, the catalogue: Kaggle's styles.csv and images -> captions.csv (one caption per image,
a seeded train/val/test split). pandas only, no TensorFlow: ``captions`` is the entry point."""
