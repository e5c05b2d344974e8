"""Headless segmentation of files and cohorts (the `[batch]` extra: SimpleITK, monai, Ray, highdicom)."""
