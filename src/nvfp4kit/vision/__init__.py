"""Image input for multimodal Gemma 4 checkpoints: preprocessing, the vision tower, prompt assembly."""
