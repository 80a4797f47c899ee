"""fedge edge agent: trains LoRA adapters of a frozen int8 model on local text and sends compressed updates."""

__version__ = "0.1.0"
