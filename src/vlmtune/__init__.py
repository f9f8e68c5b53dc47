"""vlmtune: LoRA fine-tuning of chat and vision-language models, with tracking and chat."""

__version__ = "0.1.0"
