"""Models: one factory for students and teachers (pretrained, GGUF, from scratch, cut from another
model, LoRA), the character tokenizer, and the checks of paths and architectures that need no
weights."""
