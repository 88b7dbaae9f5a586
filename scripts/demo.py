"""Placeholder demo until the training CLI lands: imports the package."""
import spadeformer

print("spadeformer", spadeformer.__version__)
