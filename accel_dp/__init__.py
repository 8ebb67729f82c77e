"""accel-dp: data-parallel language-model training recipes on Hugging Face Accelerate, and their launcher."""

__version__ = "0.1.0"
