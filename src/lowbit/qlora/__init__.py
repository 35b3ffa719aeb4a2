"""QLoRA: NF4 + double-quantization storage (storage.py, linear4bit.py), LoRA adapters (lora.py,
targets.py), the trainer (data.py, trainer.py, checkpoint.py), peft's adapter format (peft_io.py)
and merging into the base (merge.py)."""
