"""Model toolkit: torch -> .tflite conversion, recipes, structured pruning, verification."""
